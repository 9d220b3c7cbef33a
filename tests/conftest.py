import logging
import sys
import warnings

import pytest
import torch

from fewshot_lightning.cli import main

# Two CI cores: keep torch from oversubscribing them (and the timings of tests stable).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _lightning_logs_reach_caplog(caplog):
    """What Lightning's loggers log reaches ``caplog`` in every test. Lightning stops its loggers
    propagating to the root logger (where caplog listens) when the root had no handler at
    import, so a test that reads ``caplog.text`` saw Lightning's and ``rank_zero_info``'s lines
    only if an earlier test had changed that: it passed in the full suite and failed alone."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    added = [logger for logger in loggers if caplog.handler not in logger.handlers]
    for logger in added:
        logger.addHandler(caplog.handler)
    yield
    for logger in added:
        logger.removeHandler(caplog.handler)


@pytest.fixture
def cli(capfd, caplog, monkeypatch):
    """``cli(*args)`` runs ``fewshot-lightning *args`` in this process and returns its exit code
    and everything a user would see: what it printed, logged and warned (pytest intercepts
    the last two)."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(sys, "argv", ["fewshot-lightning"])  # not pytest's arguments
    # Lightning's loggers reach caplog through _lightning_logs_reach_caplog (autouse).

    def run(*args):
        caplog.clear()
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            try:
                main(list(args))
                code = 0
            except SystemExit as exit:
                code = exit.code
        printed = capfd.readouterr()
        warned = "".join(f"{w.filename}:{w.lineno}: {w.message}\n" for w in warned)
        return code, printed.out + printed.err + caplog.text + warned

    yield run
