"""A hospital's own site, a read-only archive, a case gone bad, a shared split (issue 11's reproductions).

A new site's prefix (``SITE1``: neither a HECKTOR 2022 training nor test center) must be accepted by
every command; a data folder must never be written to (splits live in run folders or ``--splits``);
a case that fails its checks after the split was written is skipped without moving any other case;
``--splits FILE`` is what every run given it uses.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from centerprompt.cli import main
from centerprompt.data.hecktor import KNOWN_CENTERS, find_cases, make_splits, split_hash

NEW = "SITE1"
TINY = ["--preset", "tiny", "--epochs", "1"]


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file and folder under ``root``: what a write would change."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            st = os.stat(Path(folder) / name)
            out[str(Path(folder, name).relative_to(root))] = (st.st_mtime_ns, st.st_size)
    return out


def _set_writable(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, tuple[int, int]]]]:
    """CHUM, MDA and a new site SITE1 (CHUP's cases renamed), three cases each, made read-only;
    with the listing taken before any command ran on it."""
    from centerprompt.data.synthetic.writer import generate_dataset

    root = tmp_path_factory.mktemp("archive")
    generate_dataset(root, centers=["CHUM", "MDA", "CHUP"], cases_per_center=3, seed=3, progress=False)
    for path in sorted(root.glob("*Tr/CHUP-*")):
        path.rename(path.with_name(path.name.replace("CHUP", NEW)))
    assert NEW not in KNOWN_CENTERS
    _set_writable(root, False)
    yield root, _listing(root)
    _set_writable(root, True)  # let pytest remove it


@pytest.fixture(scope="module")
def base(data: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pretrained on the read-only archive without SITE1, with no --splits: the split is made and kept in the run."""
    run = tmp_path_factory.mktemp("pretrain")
    assert main(["pretrain", "--data", str(data[0]), "--exclude-center", NEW, *TINY, "--out", str(run)]) == 0
    return run / "model.safetensors"


def _split(path: Path) -> dict:
    return json.loads(path.read_text())["centers"]


def test_a_new_site_is_pretrained_around_and_adapted_to(data: tuple[Path, dict], base: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    # Before the fix the prefix was refused ("unknown center 'SITE1' ... pass --centers", a flag of check-data only).
    config = json.loads((base.parent / "config.json").read_text())
    assert config["train_cases"] and not any(i.startswith(NEW) for i in config["train_cases"] + config["val_cases"])
    run = tmp_path / "adapt"
    assert main(["adapt", "--data", str(data[0]), "--center", NEW, "--base", str(base), "--strategy", "deep",
                 "--num-prompts", "2", "--shots", "1", *TINY[2:], "--out", str(run)]) == 0  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    assert summary["center"] == NEW and (run / "adapter.safetensors").exists()
    adapt_cases = json.loads((run / "config.json").read_text())["adapt_train"]
    assert adapt_cases and all(i.startswith(f"{NEW}-") for i in adapt_cases)
    assert not any(r.levelname == "ERROR" or "unknown center" in r.getMessage() for r in caplog.records)


def test_a_read_only_data_folder_is_never_written(data: tuple[Path, dict], base: Path, tmp_path: Path) -> None:
    root, before = data
    # As root the permissions are not enforced, so the listing is the check; otherwise a write fails the command.
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--data", str(root), "--base", str(base), "--centers", NEW, "--score-at", "preprocessed",
                 "--out", str(out)]) == 0  # fmt: skip
    assert _listing(root) == before and not (root / "splits.json").exists()
    # The split went into the run folder instead, recorded by hash; evaluation used the base model's split.
    kept = _split(base.parent / "splits.json")
    summary = json.loads((base.parent / "summary.json").read_text())
    config = json.loads((base.parent / "config.json").read_text())
    assert config["splits_sha256"] == summary["splits"]["sha256"] == split_hash(kept)
    assert json.loads(out.read_text())["splits"]["sha256"] == split_hash(kept)


def test_a_case_gone_bad_after_the_split_is_skipped_without_moving_others(
    data: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # fmt: skip
    root = tmp_path / "archive"
    shutil.copytree(data[0], root)
    _set_writable(root, True)
    split = make_splits(find_cases(root), seed=0)
    (root / "splits.json").write_text(json.dumps({"seed": 0, "centers": split}))  # an older version's, or the user's
    written = (root / "splits.json").read_bytes()
    bad = split["CHUM"]["train"][0]
    (root / "imagesTr" / f"{bad}__CT.nii.gz").write_bytes(b"not a NIfTI file")

    args = ["pretrain", "--data", str(root), "--exclude-center", NEW, *TINY]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert bad in err and "--skip-bad-cases" in err and "delete" not in err

    run = tmp_path / "run"
    assert main([*args, "--skip-bad-cases", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    old = [c for c in split if c != NEW]
    assert config["train_cases"] == sorted(i for c in old for i in split[c]["train"] if i != bad)
    assert config["val_cases"] == sorted(i for c in old for i in split[c]["val"])
    assert json.loads((run / "summary.json").read_text())["splits"]["skipped_cases"] == [bad]
    assert _split(run / "splits.json") == split  # the whole assignment, the bad case in its place
    assert (root / "splits.json").read_bytes() == written


def test_a_splits_file_is_honoured_and_shared(data: tuple[Path, dict], base: Path, tmp_path: Path) -> None:
    root = data[0]
    # A split whose old-center test cases are not the base model's (seed 0), so that using another split would show.
    shared, own = tmp_path / "shared.json", _split(base.parent / "splits.json")
    splits = (make_splits(find_cases(root), seed=seed) for seed in range(1, 50))
    split = next(s for s in splits if any(s[c]["test"] != own[c]["test"] for c in ("CHUM", "MDA")))
    shared.write_text(json.dumps({"seed": split.seed, "centers": split}))

    out = tmp_path / "eval.json"
    assert main(["evaluate", "--data", str(root), "--base", str(base), "--centers", "CHUM,MDA", "--splits", str(shared),
                 "--score-at", "preprocessed", "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert sorted(c["case_id"] for c in result["per_case"]) == sorted(split["CHUM"]["test"] + split["MDA"]["test"])
    assert result["splits"]["sha256"] == split.sha256 and result["splits"]["source"] == str(shared)
    inspected = tmp_path / "inspect.json"  # inspect (and the bank's commands) take the same --splits
    assert main(["inspect", "--data", str(root), "--base", str(base), "--centers", "CHUM,MDA", "--splits", str(shared),
                 "--score-at", "preprocessed", "--out", str(inspected)]) == 0  # fmt: skip
    reliance = json.loads(inspected.read_text())
    assert sorted(reliance["cases"]) == sorted(split["CHUM"]["test"] + split["MDA"]["test"])
    assert reliance["splits"]["sha256"] == split.sha256

    exp = tmp_path / "exp"
    assert main(["experiment", "--data", str(root), "--new-center", NEW, "--base", str(base), "--strategies", "deep",
                 "--shots", "1", "--num-prompts", "2", "--adapt-epochs", "1", "--splits", str(shared),
                 "--score-at", "preprocessed", "--out", str(exp)]) == 0  # fmt: skip
    results = json.loads((exp / "results.json").read_text())
    assert results["splits"]["sha256"] == split.sha256 and _split(exp / "splits.json") == split
    stage = json.loads((exp / "adapt" / "deep" / "config.json").read_text())
    assert stage["splits_sha256"] == split.sha256  # every stage, one split
    assert sorted(results["old_center_test_cases"]) == sorted(split["CHUM"]["test"] + split["MDA"]["test"])
    assert set(results["new_center_test_cases"]) >= set(split[NEW]["test"])

    # A --splits file that does not exist yet is written with the split the command uses (here the base
    # model's), so the next run given it shares it.
    fresh = tmp_path / "fresh.json"
    assert main(["evaluate", "--data", str(root), "--base", str(base), "--centers", NEW, "--splits", str(fresh),
                 "--score-at", "preprocessed", "--out", str(out)]) == 0  # fmt: skip
    assert _split(fresh) == _split(base.parent / "splits.json")


def test_a_new_sites_own_folder_is_adapted_to_with_the_bases_split(data: tuple[Path, dict], base: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """Two new hospitals' folder, no --splits: the base's recorded split lists CHUM and MDA, absent here
    (left out, not missing cases), and SITE1 but not SITE2, which gets a split of its own; one adapter
    is trained on both sites' cases pooled."""
    hospital = tmp_path / "hospital"
    for part in ("imagesTr", "labelsTr"):
        (hospital / part).mkdir(parents=True)
        for path in sorted((data[0] / part).glob(f"{NEW}-*")):
            for site in (NEW, "SITE2"):
                shutil.copy(path, hospital / part / path.name.replace(NEW, site))
    run = tmp_path / "adapt"
    # Before: "the split in <base> lists 6 case(s) that are not usable labelled cases" (exit 2).
    assert main(["adapt", "--data", str(hospital), "--center", f"{NEW},SITE2", "--base", str(base), "--strategy", "deep",
                 "--num-prompts", "2", "--shots", "1", *TINY[2:], "--out", str(run)]) == 0  # fmt: skip
    own = make_splits(find_cases(hospital), seed=0)
    kept = _split(run / "splits.json")
    assert {c: kept[c] for c in (NEW, "SITE2")} == own  # what a split of the folder alone gives
    assert {c: kept[c] for c in ("CHUM", "MDA")} == {c: _split(base.parent / "splits.json")[c] for c in ("CHUM", "MDA")}
    config = json.loads((run / "config.json").read_text())
    assert sorted(i.split("-")[0] for i in config["adapt_train"]) == [NEW, "SITE2"]  # one shot of each, pooled
    assert not set(config["adapt_train"] + config["adapt_val"]) & set(own[NEW]["test"] + own["SITE2"]["test"])
    assert not any("another split" in r.getMessage() for r in caplog.records)
