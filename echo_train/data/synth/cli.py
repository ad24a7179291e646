"""`echo-train synth`: write the synthetic chest X-ray benchmark."""
from __future__ import annotations

import json

import click


@click.command("synth")
@click.option("--out", "out", default="data/synth", show_default=True, type=click.Path(file_okay=False),
              help="Output folder (images/, train/val/test.json, meta.json).")
@click.option("--n-train", default=2000, show_default=True, type=int)
@click.option("--n-val", default=200, show_default=True, type=int)
@click.option("--n-test", default=200, show_default=True, type=int)
@click.option("--image-size", default=128, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--preview/--no-preview", default=False, show_default=True, help="Also write preview.png.")
@click.option("--workers", default=2, show_default=True, type=int, help="Image-drawing processes.")
def synth_command(out, n_train, n_val, n_test, image_size, seed, preview, workers):
    """Generate the procedural chest X-ray benchmark with exact ground truth."""
    from tqdm import tqdm

    from .generate import generate_synth

    with tqdm(total=n_train + n_val + n_test, unit="img", desc="synth") as bar:
        meta = generate_synth(out, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size, seed=seed,
                              preview=preview, workers=workers, progress=bar.update)
    click.echo(json.dumps(meta, indent=1))


if __name__ == "__main__":  # pragma: no cover
    synth_command()
