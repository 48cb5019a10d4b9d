"""Prompt bank safety: bank.json cannot point outside the folder, names match whole, writers take a lock."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_bank import _adapter, _base  # the tiny base model and prompt adapters of the bank tests

from centerprompt.artifacts import load_model
from centerprompt.bank import PromptBank, validate_center
from centerprompt.bank.storage import PROMPT_TENSOR
from centerprompt.cli import main

# Children inherit the imported torch (no 10 s start-up each); daemons, so a failed test never waits on one.
FORK = multiprocessing.get_context("fork")


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    return _base(tmp_path / "model.safetensors")


def _bank_cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, list[str]]:
    """Exit status of ``centerprompt bank ARGV`` and the lines it wrote to stderr."""
    capsys.readouterr()
    status = main(["bank", *map(str, argv)])
    return status, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("how", ["relative key_file", "absolute file", "symlinked file"])
def test_entries_pointing_outside_the_bank_are_refused(
    tmp_path: Path, base_file: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:  # fmt: skip
    """A crafted bank.json makes remove delete nothing and list/load read nothing outside the folder."""
    bank = tmp_path / "bank"
    PromptBank(bank).add("CHUM", _adapter(base_file, tmp_path / "a.safetensors"))
    victim = tmp_path / "victim.txt"  # ../victim.txt seen from the bank
    victim.write_text("precious")
    index = json.loads((bank / "bank.json").read_text())
    if how == "relative key_file":
        index["entries"][0]["key_file"] = "../victim.txt"
    elif how == "absolute file":
        index["entries"][0]["file"] = str(victim)
    else:
        (bank / "CHUM.safetensors").unlink()
        (bank / "CHUM.safetensors").symlink_to(victim)
    (bank / "bank.json").write_text(json.dumps(index))
    before = (bank / "bank.json").read_bytes()

    for argv in (("remove", "--bank", bank, "--center", "CHUM"), ("list", "--bank", bank)):
        status, err = _bank_cli(capsys, *argv)
        assert status == 2 and len(err) == 1, (argv, err)
        assert "entry 'CHUM'" in err[0] and str(victim.resolve()) in err[0] and "refusing" in err[0]
    with pytest.raises(ValueError, match="entry 'CHUM'.*refusing"):
        PromptBank.load(bank, load_model(base_file))
    assert victim.read_text() == "precious"
    assert (bank / "bank.json").read_bytes() == before


def test_center_name_with_a_trailing_newline_is_refused(tmp_path: Path, base_file: Path) -> None:
    """``re.match`` with ``$`` accepted "X\\n" and banked the file "X\\n.safetensors"."""
    with pytest.raises(ValueError, match="center name"):
        validate_center("X\n")
    with pytest.raises(ValueError, match="center name"):
        PromptBank(tmp_path / "bank").add("X\n", _adapter(base_file, tmp_path / "a.safetensors"))
    assert not (tmp_path / "bank").exists()  # refused before the bank folder is created


def _add_after_barrier(bank: Path, center: str, adapter: Path, barrier: Barrier) -> None:
    barrier.wait(timeout=60)
    PromptBank(bank).add(center, adapter)


def test_concurrent_adds_keep_every_center_20_times(tmp_path: Path, base_file: Path) -> None:
    """Four processes add four centers to one bank at once, 20 times over: every center lands, every
    file it names holds its own adapter's prompts, and no orphan is left. Without the writers' lock
    an add lost another's row or deleted its new file as an orphan."""
    centers = ("CHUV", "HGJ", "HMR", "MDA")
    adapters = {c: _adapter(base_file, tmp_path / f"adapter-{c}.safetensors", seed=i) for i, c in enumerate(centers)}
    expected = {c: load_file(a)[PROMPT_TENSOR] for c, a in adapters.items()}
    for rep in range(20):
        bank = tmp_path / f"bank{rep}"
        barrier = FORK.Barrier(len(centers))
        procs = [FORK.Process(target=_add_after_barrier, args=(bank, c, a, barrier), daemon=True)
                 for c, a in adapters.items()]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * len(centers), f"repetition {rep}"
        entries = json.loads((bank / "bank.json").read_text())["entries"]
        assert sorted(e["center"] for e in entries) == sorted(centers), f"repetition {rep}"
        assert sorted(p.name for p in bank.iterdir()) == sorted(["bank.json", *(e["file"] for e in entries)])
        for e in entries:
            assert torch.equal(load_file(bank / e["file"])[PROMPT_TENSOR], expected[e["center"]]), f"rep {rep}"
    loaded = PromptBank.load(bank, load_model(base_file))
    assert sorted(loaded.names) == sorted(centers) and loaded.prompts.shape[0] == len(centers)


def _hold_lock(bank: Path, locked: Event, release: Event) -> None:
    with PromptBank(bank)._locked():
        locked.set()
        release.wait(60)


def _write(bank: Path, action: str, adapter: Path) -> None:
    if action == "add":
        PromptBank(bank).add("HGJ", adapter)
    else:
        PromptBank(bank).remove("CHUM")


@pytest.mark.parametrize("action", ["add", "remove"])
def test_writers_wait_for_the_lock(tmp_path: Path, base_file: Path, action: str) -> None:
    """An add or remove changes nothing while another process holds the lock, and finishes after.

    The holder is a process of its own: a forked child would share this process's lock."""
    bank, adapter = PromptBank(tmp_path / "bank"), _adapter(base_file, tmp_path / "a.safetensors")
    bank.add("CHUM", adapter)
    before = bank.index_path.read_bytes()
    locked, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold_lock, args=(bank.path, locked, release), daemon=True)
    writer = FORK.Process(target=_write, args=(bank.path, action, adapter), daemon=True)
    holder.start()
    try:
        assert locked.wait(60)
        writer.start()
        writer.join(1.0)
        assert writer.exitcode is None and bank.index_path.read_bytes() == before
        assert sorted(p.name for p in bank.path.iterdir()) == ["CHUM.safetensors", "bank.json"]
    finally:
        release.set()
    holder.join(60)
    writer.join(60)
    assert writer.exitcode == 0
    assert bank.names() == (["CHUM", "HGJ"] if action == "add" else [])


def test_clean_up_spares_files_written_after_the_lock_was_taken(tmp_path: Path, base_file: Path) -> None:
    """Only unnamed files older than the writer's lock are orphans; a newer one may be on its way in."""
    bank, adapter = PromptBank(tmp_path / "bank"), _adapter(base_file, tmp_path / "a.safetensors")
    bank.add("CHUM", adapter)
    old, new = bank.path / "HGJ.safetensors", bank.path / "HMR.safetensors"
    for path, age in ((old, -60), (new, 60)):
        path.write_bytes(b"no row in bank.json")
        os.utime(path, (time.time() + age, time.time() + age))
    bank.add("MDA", adapter)
    assert not old.exists() and new.exists()


def test_list_of_a_missing_bank_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped --bank is an error naming the folder (it said "is empty", exit 0); an empty folder lists."""
    missing = tmp_path / "no-such-bank"
    for argv in (("list", "--bank", missing), ("remove", "--bank", missing, "--center", "CHUM")):
        status, err = _bank_cli(capsys, *argv)
        assert status == 2 and len(err) == 1 and str(missing) in err[0], (argv, err)
    assert not missing.exists()
    (tmp_path / "empty").mkdir()
    assert main(["bank", "list", "--bank", str(tmp_path / "empty")]) == 0
    assert "is empty" in capsys.readouterr().out
