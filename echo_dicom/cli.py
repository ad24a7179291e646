"""`echo-dicom`: a DICOM node that reports chest X-ray studies from a PACS and sends the SR back.

    echo-dicom listen --engine-dir engines/echo --state-dir /var/lib/echo-dicom \\
        --ae-title ECHO --port 11112 --allow-aet ORTHANC --pacs ORTHANC@127.0.0.1:4242
    echo-dicom poll   --engine-dir engines/echo --state-dir /var/lib/echo-dicom \\
        --dicomweb-url http://127.0.0.1:8042/dicom-web
    echo-dicom status  --state-dir /var/lib/echo-dicom
    echo-dicom trigger --state-dir /var/lib/echo-dicom STUDY_UID

Exit status: 0 stopped cleanly (SIGINT/SIGTERM), 2 unusable options, engine folder or port.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
import time
from typing import Callable, Optional

import click

from runtime import precisions
from runtime.errors import EchoRuntimeError

log = logging.getLogger("echo_dicom")

COMPLETE_HELP = ("quiet: a study is complete once no image of it arrived for --quiet-seconds; "
                 "trigger: only when `echo-dicom trigger` names it")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s echo-dicom %(levelname)s %(message)s")
    for noisy in ("pynetdicom", "dicomweb_client"):  # their INFO is one line per PDU or request
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _die(msg: str) -> None:
    click.echo(f"echo-dicom: error: {msg}", err=True)
    sys.exit(2)


def node_options(f: Callable) -> Callable:
    """The options `listen` and `poll` share: the engine, the state, the study-complete rule, retries."""
    opts = [
        click.option("--engine-dir", required=True, type=click.Path(),
                     help="engine folder built by `echo-export build`"),
        click.option("--precision", type=click.Choice(list(precisions.NAMES)), default="fp32", show_default=True),
        click.option("--state-dir", required=True, type=click.Path(file_okay=False),
                     help="the node's received images, outbox and sqlite state; keep it across restarts"),
        click.option("--complete-on", type=click.Choice(["quiet", "trigger"]), default="quiet", show_default=True,
                     help=COMPLETE_HELP),
        click.option("--quiet-seconds", type=click.FloatRange(min=0), default=10.0, show_default=True),
        click.option("--batch", type=click.IntRange(1, 64), default=8, show_default=True,
                     help="studies per generate call, SRs per association"),
        click.option("--retry-base", type=click.FloatRange(min=0.01), default=2.0, show_default=True,
                     help="seconds before the first retry of an SR the PACS did not take (doubling)"),
        click.option("--retry-cap", type=click.FloatRange(min=0.01), default=300.0, show_default=True,
                     help="longest wait between retries, seconds"),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads"),
        click.option("--verbose", "-v", is_flag=True, help="debug logging, pynetdicom's too"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _make_node(kw: dict, sender):
    from .node import Node, NodeOptions

    opts = NodeOptions(engine_dir=kw["engine_dir"], state_dir=kw["state_dir"], precision=kw["precision"],
                       quiet_s=kw["quiet_seconds"] if kw["complete_on"] == "quiet" else None, batch=kw["batch"],
                       retry_base_s=kw["retry_base"], retry_cap_s=kw["retry_cap"], threads=kw["threads"])
    try:
        return Node(opts, sender)
    except EchoRuntimeError as e:
        _die(str(e))


def _serve_until_signal(node, on_stop: Optional[Callable[[], None]] = None) -> None:
    """Block until SIGINT/SIGTERM, then stop intake first, then the workers."""
    stopping = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(1) or node.stop.set())
    while not node.stop.wait(1.0):
        pass
    log.info("stopping (%s)", "signal" if stopping else "stop requested")
    if on_stop:
        on_stop()
    node.shutdown()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """A DICOM node for ECHO: receives chest X-ray studies (CR/DX) from a PACS, writes a preliminary
    report for each complete study with the engine, and stores it back in the same study as a
    DICOM Basic Text SR (UNVERIFIED, the engine as Contributing Equipment, series "machine-generated,
    not for diagnostic use"). One report per (StudyInstanceUID, engine version); what is not yet
    sent waits in a persistent outbox (--state-dir) and is retried with backoff, across restarts."""


@main.command()
@node_options
@click.option("--ae-title", default="ECHO", show_default=True, help="this node's AE title")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(1, 65535), default=11112, show_default=True)
@click.option("--allow-aet", multiple=True, help="calling AE title allowed to send (repeat); none: refuse to start "
              "unless --allow-any-aet")
@click.option("--allow-any-aet", is_flag=True, help="accept associations from any calling AE title")
@click.option("--pacs", required=True, help="where reports go, AET@HOST:PORT (C-STORE), e.g. ORTHANC@127.0.0.1:4242")
@click.option("--send-associations", type=click.IntRange(1, 16), default=4, show_default=True,
              help="parallel associations to --pacs when several SRs are due (each takes --batch of them)")
@click.option("--pacs-timeout", type=click.FloatRange(min=0.5), default=10.0, show_default=True,
              help="seconds to wait for the PACS to answer an association or a C-STORE")
def listen(ae_title, host, port, allow_aet, allow_any_aet, pacs, send_associations, pacs_timeout, **kw) -> None:
    """C-STORE SCP: receive studies, send each report to --pacs with C-STORE."""
    from .scp import StoreHandler, make_ae, start_scp
    from .senders import CStoreSender, PacsAddress

    if not allow_aet and not allow_any_aet:
        _die("name the senders with --allow-aet (or accept anyone with --allow-any-aet)")
    try:
        sender = CStoreSender(PacsAddress.parse(pacs), ae_title, associations=send_associations,
                              timeout_s=pacs_timeout)
    except ValueError as e:
        _die(str(e))
    _setup_logging(kw["verbose"])  # after the option checks: those errors are one plain line
    node = _make_node(kw, sender)
    ae = make_ae(ae_title, [] if allow_any_aet else list(allow_aet))
    try:
        server = start_scp(ae, host, port, StoreHandler(node.store, node.check_pixels, node.version))
    except OSError as e:
        _die(f"cannot listen on {host}:{port}: {e.strerror or e}")
    node.start_workers()
    log.info("listening as %s on %s:%d (allowed: %s), engine %s, reports to %s", ae_title, host, port,
             "any" if allow_any_aet else ", ".join(allow_aet), node.version, pacs)
    _serve_until_signal(node, server.shutdown)


@main.command()
@node_options
@click.option("--dicomweb-url", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
@click.option("--poll-seconds", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="seconds between QIDO-RS polls")
@click.option("--http-timeout", type=click.FloatRange(min=0.1), default=20.0, show_default=True)
def poll(dicomweb_url, poll_seconds, http_timeout, **kw) -> None:
    """DICOMweb: find CR/DX studies with QIDO-RS, fetch with WADO-RS, store each report with STOW-RS."""
    from .dicomweb import WebSource, describe_error, make_client
    from .senders import StowSender

    _setup_logging(kw["verbose"])
    client = make_client(dicomweb_url, http_timeout)
    node = _make_node(kw, StowSender(client))
    source = WebSource(client, node.store, node.check_pixels, node.version)
    last = [0.0]

    def poll_step() -> int:
        if time.monotonic() - last[0] < poll_seconds:
            return 0
        last[0] = time.monotonic()
        try:
            return source.poll()
        except Exception as e:  # the server down or a bad answer: said once a poll, tried again next poll
            log.warning("poll of %s failed: %s", dicomweb_url, describe_error(e))
            return 0

    node.start_workers({"poll": poll_step})
    log.info("polling %s every %.1f s, engine %s", dicomweb_url, poll_seconds, node.version)
    _serve_until_signal(node)


@main.command()
@click.option("--state-dir", required=True, type=click.Path(file_okay=False, exists=True))
@click.option("--reports", "show_reports", is_flag=True, help="also one JSON line per report")
def status(state_dir, show_reports) -> None:
    """Counts of the node's state: instances, studies, reports by state, refusals (one JSON line)."""
    from .store import Store

    store = Store(state_dir)
    click.echo(json.dumps(store.counts()))
    if show_reports:
        for r in store.reports():
            click.echo(json.dumps(r))


@main.command()
@click.option("--state-dir", required=True, type=click.Path(file_okay=False, exists=True))
@click.argument("study_uids", nargs=-1, required=True)
def trigger(state_dir, study_uids) -> None:
    """Mark studies complete now (the explicit study-complete signal); exit 1 if one is unknown."""
    from .store import Store

    store = Store(state_dir)
    unknown = [u for u in study_uids if not store.trigger(u)]
    for u in unknown:
        click.echo(f"echo-dicom: no image of study {u} has been received", err=True)
    sys.exit(1 if unknown else 0)


if __name__ == "__main__":
    main()
