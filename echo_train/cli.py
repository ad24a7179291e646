"""`echo-train`: synthesise data, train the three stages, decode with the reference decoders."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from runtime.prompt import DEFAULT_IMPORT_PROMPT, PROMPT_PRESETS
from runtime.schedule import DECODE_LAYOUTS, DEFAULT_UNMASK_RULE, LAYOUT_OFFICIAL, UNMASK_RULES

from .stages.errors import StageError
from .stages.stage2_rad import Stage2Config
from .stages.train_options import train_config_from_options, train_options

_STAGE2_DEFAULTS = Stage2Config()


class Refused(click.ClickException):
    """A Hugging Face folder the model cannot take in: one line, exit status 2, nothing written."""

    exit_code = 2


class _Group(click.Group):
    """Every command's StageError becomes click's one-line error and exit status 1, a refused
    pretrained folder (PretrainedError) one line and exit status 2: the stages raise, only the
    CLI exits."""

    def invoke(self, ctx: click.Context):
        from .model.errors import PretrainedError

        try:
            return super().invoke(ctx)
        except StageError as e:
            raise click.ClickException(str(e)) from None
        except PretrainedError as e:
            raise Refused(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train ECHO: stage 1 (AR), stage 2 (RAD teacher), stage 3 (DCD one-step student).

    Typical order: synth -> stage1 -> stage2 -> stage3 -> generate. Every stage resumes from its
    output folder when interrupted (run the same command again). Under `torchrun` the same
    command trains on several processes.
    """


def _register_synth() -> None:
    try:
        from .data.synth.cli import synth_command
    except ImportError as e:  # keep the other commands usable
        reason = str(e)

        @main.command("synth")
        def synth_missing() -> None:
            """Synthetic benchmark (unavailable)."""
            raise click.ClickException(f"the synthetic benchmark could not be imported: {reason}")
        return
    main.add_command(synth_command, "synth")


_register_synth()


@main.command("stage1")
@click.option("--data", default="data/synth", show_default=True, help="Dataset (folder or JSON) with train/val splits.")
@click.option("--out", default="runs/ar", show_default=True)
@click.option("--preset", default="tiny", show_default=True, help="Model size preset: tiny or test.")
@click.option("--vision", "vision_family", default="vit", show_default=True, type=click.Choice(["vit", "siglip", "dinov2"]))
@click.option("--vocab-size", type=int, default=1024, show_default=True)
@click.option("--init-lm", default=None, type=click.Path(file_okay=False),
              help="Local Hugging Face folder of a Qwen2 / Qwen2.5 / Qwen3 causal LM: its weights and its own "
                   "tokenizer.json (our special tokens added) replace the preset's LM and trained BPE.")
@click.option("--init-vision", default=None, type=click.Path(file_okay=False),
              help="Local Hugging Face folder of a SigLIP, ViT or DINOv2 vision model: its weights, and the image "
                   "size and mean/std of its preprocessor_config.json, replace the preset's tower.")
@train_options
def stage1(data, out, preset, vision_family, vocab_size, init_lm, init_vision, **kw) -> None:
    """Stage 1: train the autoregressive VLM (response-only next-token loss).

    With --init-lm / --init-vision it starts from pretrained parts; a folder that does not fit is
    refused with one message and exit status 2, before anything is written."""
    from .stages.stage1_ar import Stage1Config, run_stage1

    cfg = Stage1Config(data=data, out=out, preset=preset, vocab_size=vocab_size, vision_family=vision_family,
                       init_lm=init_lm, init_vision=init_vision, train_limit=kw["train_limit"])
    cfg.train = train_config_from_options(cfg.train, kw)
    run_stage1(cfg)


@main.command("stage2")
@click.option("--data", default="data/synth", show_default=True)
@click.option("--init", default="runs/ar", show_default=True, help="Stage-1 checkpoint to convert.")
@click.option("--out", default="runs/base", show_default=True)
@click.option("--block-size", type=click.Choice(["4", "8", "16"]), default="8", show_default=True)
@click.option("--noisy-copies", "n_noisy", type=int, default=1, show_default=True, help="K noisy response copies (RAD).")
@click.option("--symmetric", is_flag=True, help="BD3-style duplication of the whole sequence (ablation).")
@click.option("--shifted/--aligned", "shifted", default=True, show_default=True,
              help="Read block token j from the logits of position j-1, as the AR model does (shifted), "
                   "or from its own position (aligned: the ablation).")
@click.option("--causal-context/--block-causal-context", "causal_context", default=_STAGE2_DEFAULTS.causal_context,
              show_default=True,
              help="Keep the AR model's causal attention over the clean context (prefix and committed blocks) "
                   "instead of making it bidirectional inside each block.")
@click.option("--ar-weight", type=float, default=_STAGE2_DEFAULTS.ar_weight, show_default=True,
              help="Weight of stage 1's next-token loss on the clean copy, trained beside the diffusion loss "
                   "(needs --causal-context; 0 = diffusion loss only).")
@train_options
def stage2(data, init, out, block_size, n_noisy, symmetric, shifted, causal_context, ar_weight, **kw) -> None:
    """Stage 2: RAD block-diffusion conversion of the AR model (the multi-step teacher)."""
    from .stages.stage2_rad import run_stage2

    cfg = Stage2Config(data=data, init=init, out=out, block_size=int(block_size), n_noisy=n_noisy, symmetric=symmetric,
                       shifted_prediction=shifted, causal_context=causal_context, ar_weight=ar_weight,
                       train_limit=kw["train_limit"])
    cfg.train = train_config_from_options(cfg.train, kw)
    run_stage2(cfg)


@main.command("import-hf")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--out", required=True, help="ECHO checkpoint folder to write (e.g. runs/echo_block8).")
@click.option("--stage", type=click.Choice(["ar", "rad", "dcd"]), default="dcd", show_default=True,
              help="What the folder holds: an AR VLM, a multi-step block-diffusion model (ECHO Base) or a one-step "
                   "student (ECHO).")
@click.option("--block-size", type=click.Choice(["4", "8", "16"]), default="8", show_default=True)
@click.option("--native/--fixed-grid", default=None,
              help="native: each image at the processor's own grid (aspect ratio kept, --max-pixels), as the "
                   "official code runs; fixed grid: every image squeezed to --image-size. [default: native in the "
                   "official layout]")
@click.option("--max-pixels", type=int, default=2_250_000, show_default=True,
              help="Native resolution: an image larger than this is scaled down to it (the official code's value).")
@click.option("--min-pixels", type=int, default=None,
              help="Native resolution: an image smaller than this is scaled up [default: the folder's processor's].")
@click.option("--image-size", type=int, default=448, show_default=True,
              help="--fixed-grid: the one square image size (a multiple of 28: 448 px -> 256 image tokens).")
@click.option("--mask-token", default=None,
              help="The mask token, when neither config.json (mask_token_id) nor the tokenizer names one.")
@click.option("--max-response-tokens", type=int, default=256, show_default=True)
@click.option("--chat-template/--no-chat-template", default=True, show_default=True,
              help="Prompt with the folder's chat template (system turn, user turn with the image and the "
                   "instruction, assistant header), as the model was trained; without: ECHO's own prefix.")
@click.option("--prompt", "prompt_preset", type=click.Choice(list(PROMPT_PRESETS)), default=DEFAULT_IMPORT_PROMPT,
              show_default=True,
              help="The user turn's instruction by name: the official ECHO code's Chinese (its scripts' default) or "
                   "English one (its README's), or ECHO's own. Use the one the checkpoint was trained with.")
@click.option("--instruction", default=None,
              help="The user turn's text after the image, instead of a --prompt preset.")
@click.option("--layout", type=click.Choice(list(DECODE_LAYOUTS)), default=LAYOUT_OFFICIAL, show_default=True,
              help="official: decode as the official ECHO inference code does (prompt unpadded, the block grid "
                   "from its first token, its last partial block decoded with the first masks); echo: the prompt "
                   "left-padded to whole blocks (earlier versions of this tool).")
@click.option("--system", default=None,
              help="A system turn's text [default: none given, so the chat template's own default system prompt].")
@click.option("--preprocess", type=click.Choice(["processor", "echo"]), default="processor", show_default=True,
              help="Image preparation: as Qwen2-VL's image processor at the fixed grid (8-bit values kept, bicubic), "
                   "or ECHO's own (each image stretched to its own range, bilinear).")
@click.option("--force", is_flag=True, help="Replace an existing --out folder.")
def import_hf(folder, out, stage, block_size, native, max_pixels, min_pixels, image_size, mask_token, max_response_tokens,
              chat_template, prompt_preset, instruction, layout, system, preprocess, force) -> None:
    """Import a Qwen2.5-VL-architecture Hugging Face FOLDER (e.g. a downloaded ECHO_block8) as an ECHO
    checkpoint that the decoders, `echo-export build` and the runtime take like a trained one.

    A folder that does not fit is refused with one message and exit status 2, nothing written."""
    from .model.qwen2_5_vl import ImportOptions, import_qwen2_5_vl

    if Path(out).exists() and not force:
        raise click.UsageError(f"--out {out} exists; pass --force to replace it")
    import_qwen2_5_vl(ImportOptions(folder=folder, out=out, stage=stage, block_size=int(block_size),
                                    image_size=image_size, mask_token=mask_token,
                                    max_response_tokens=max_response_tokens, chat_template=chat_template,
                                    instruction=instruction, system=system, preprocess=preprocess,
                                    prompt=prompt_preset, layout=layout, native=native, max_pixels=max_pixels,
                                    min_pixels=min_pixels), log=click.echo)


def _register_stage3() -> None:
    try:
        from .stages.stage3_cli import stage3_command
    except ImportError:
        return
    main.add_command(stage3_command, "stage3")


_register_stage3()


@main.command("generate")
@click.option("--ckpt", required=True, help="Checkpoint folder.")
@click.option("--data", default="data/synth", show_default=True)
@click.option("--split", default="test", show_default=True)
@click.option("--mode", type=click.Choice(["ar", "multistep", "onestep", "onestep-unfused"]), required=True)
@click.option("--steps", type=int, default=None, help="Denoising steps per block (multistep; default = block size).")
@click.option("--block-size", type=int, default=None, help="Default: the checkpoint's.")
@click.option("--rule", type=click.Choice(list(UNMASK_RULES)), default=DEFAULT_UNMASK_RULE, show_default=True,
              help="Multistep unmasking: dynamic-ltr = every position above the confidence threshold plus at least "
                   "B/steps taken leftmost first; dynamic = the same, most confident first; static = exactly B/steps, "
                   "most confident first.")
@click.option("--n", "limit", type=int, default=None, help="Only the first N studies.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--max-new-tokens", type=int, default=None)
@click.option("--out", "out_path", default=None, help="Write predictions JSONL here.")
@click.option("--device", default="auto", show_default=True)
@click.option("--against", "against_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Another system's predictions JSONL (from --out) on the same studies: also print the finding-F1 "
                   "difference to it with a paired bootstrap 95% CI (1000 resamples).")
def generate(ckpt, data, split, mode, steps, block_size, rule, limit, batch_size, max_new_tokens, out_path, device,
             against_path) -> None:
    """Decode a split with a PyTorch reference decoder and print quick quality figures."""
    from .decoding.run import DecodeSpec, decode_studies
    from .model.checkpoint import CheckpointError, load_checkpoint
    from .stages.common import load_split
    from .stages.trainer import pick_device

    try:
        model, tok = load_checkpoint(ckpt)
    except CheckpointError as e:
        raise click.ClickException(str(e))
    studies = load_split(data, split, limit)
    spec = DecodeSpec(mode=mode, block_size=block_size or model.cfg.block_size, steps=steps, rule=rule,
                      max_new_tokens=max_new_tokens or model.cfg.max_response_tokens)
    preds, stats = decode_studies(model, tok, studies, spec, batch_size=batch_size, device=pick_device(device))
    if out_path:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "w") as f:
            for s in studies:
                f.write(json.dumps({"id": s.id, "report": preds[s.id]}) + "\n")
    refs = {s.id: s.report for s in studies}
    out = {**spec.__dict__, **stats, **quick_quality(preds, refs)}
    if against_path:
        out["finding_micro_f1_vs_against"] = paired_f1_against(preds, refs, against_path)
    click.echo(json.dumps(out, indent=2))


def paired_f1_against(preds: dict[str, str], refs: dict[str, str], against_path: str) -> dict:
    """Finding micro F1 of preds minus that of the JSONL at against_path, same studies, paired CI."""
    from .metrics.cli import read_reports
    from .metrics.finding_f1 import paired_micro_f1_difference

    other = read_reports(against_path)
    missing = [i for i in preds if i not in other]
    if missing:
        raise click.ClickException(f"{against_path}: no prediction for {len(missing)} of these studies, e.g. {missing[:3]}")
    d = paired_micro_f1_difference(preds, other, refs, n_boot=1000, seed=0)
    return {"against": str(against_path), "delta": d["delta"], "ci95": d["ci95"], "n": d["n"]}


def quick_quality(preds: dict[str, str], refs: dict[str, str]) -> dict:
    """Finding F1 and (on the synthetic benchmark) sentence validity: the cheap figures."""
    from .metrics import finding_f1

    f1 = finding_f1(preds, refs)
    out = {"finding_micro_f1": f1["micro_f1"], "finding_micro_f1_5": f1["micro_f1_5"]}
    try:
        from .metrics.validity import sentence_validity

        v = sentence_validity(preds)
        out.update(valid_sentence_rate=v["valid_sentence_rate"], repeat_or_contradiction_rate=v["repeat_or_contradiction_rate"])
    except Exception as e:  # grammar only exists for the synthetic benchmark
        out["validity"] = f"not computed: {e}"
    return out


if __name__ == "__main__":
    sys.exit(main())
