"""End-to-end sweep of the hostile-input cases, each run as a user would from a shell.

Every case is one ``centerprompt ...`` subprocess (``sys.executable -m centerprompt``, OMP_NUM_THREADS=1,
the ``tiny`` preset) in a temporary folder holding a small synthetic dataset, two tiny base models, an
adapter and a bank. For each case the script records the exit status, the last line of stderr, whether
a traceback appeared and whether any file outside what the command may write changed (SHA-256 of every
file in the temporary folder before and after), and classifies the outcome from those facts: refused,
correct, data loss, silently wrong, traceback, hang or misleading. It writes benchmarks/hostile.md and
benchmarks/hostile.json, then deletes the temporary folder. About 10 minutes on a 2-core CPU.

    python benchmarks/hostile.py
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 60
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
NOT_RUN = [
    ("read-only --out folder", "the sweep runs as root, whom file permissions do not stop (/proc stands in)"),
    ("full disk", "needs a small file system mounted for the run; not possible without privileges here"),
]


@dataclass
class Case:
    """One command; it may write below w/out/NAME (and ``writes``), every other file must stay as it was."""

    group: str
    name: str
    expected: str
    argv: list[str]
    names: tuple[str, ...] = ()  # the message must hold each ("a|b": either)
    writes: tuple[Path, ...] = ()  # what the command may change besides w/out/NAME
    check: Callable[[], bool] | None = None  # after exit 0: is the result right? (None: exit 0 is wrong)
    interrupt_after: str = ""  # send SIGINT once stderr shows this
    holder: list[str] = field(default_factory=list)  # a command started first that holds --out
    stream: str = "stderr"  # where the message is read


@dataclass
class Outcome:
    exit_code: int | None
    message: str
    traceback: bool
    changed: list[str]
    seconds: float


def hashes(root: Path, allowed: tuple[Path, ...]) -> dict[str, str]:
    """SHA-256 of every file below ``root`` outside the ``allowed`` outputs."""
    def free(p: Path) -> bool:
        return not any(p == a or a in p.parents for a in allowed)

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and free(p)}


def start(argv: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """``centerprompt ARGV`` in its own process group; stderr to ``log``, stdout beside it (.out)."""
    with log.open("wb") as err, log.with_suffix(".out").open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "centerprompt", *argv], cwd=cwd, env=ENV, stdout=out,
                                stderr=err, start_new_session=True)


def wait_for(proc: subprocess.Popen, log: Path, marker: str, timeout: float = TIMEOUT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if marker in log.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the process group of a child this script started, as a terminal would."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)


def finish(proc: subprocess.Popen) -> int | None:
    """The exit status, or None after killing a child that ran past the timeout."""
    try:
        return proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop(proc)
        proc.wait()
        return None


def run(case: Case, root: Path, logs: Path) -> Outcome:
    """Run one case; the classification only uses what this returns."""
    log, holder = logs / f"{case.name}.err", None
    if case.holder:
        holder = start(case.holder, root / "cwd", logs / f"{case.name}.holder.err")
        wait_for(holder, logs / f"{case.name}.holder.err", "pretraining on")
        case.names = tuple(n.format(pid=holder.pid) for n in case.names)
    allowed = (root / "out" / case.name, *case.writes)
    before, began = hashes(root, allowed), time.monotonic()
    proc, at_signal = start(case.argv, root / "cwd", log), None
    if case.interrupt_after and wait_for(proc, log, case.interrupt_after):
        time.sleep(2.0)
        at_signal = len(log.read_text(errors="replace").splitlines())
        stop(proc, signal.SIGINT)
    code, seconds = finish(proc), time.monotonic() - began
    if holder is not None:
        stop(holder, signal.SIGINT)
        finish(holder)
    err, out = log.read_text(errors="replace"), log.with_suffix(".out").read_text(errors="replace")
    lines = [ln for ln in (err if case.stream == "stderr" else out).splitlines()[at_signal or 0:] if ln.strip()]
    if case.interrupt_after and at_signal is None:
        lines = [f"no Ctrl-C sent: {case.interrupt_after!r} never appeared on stderr"]
    elif case.interrupt_after and len(lines) != 1:
        lines = [f"{len(lines)} lines after Ctrl-C, the last: {lines[-1] if lines else ''}"]
    after = hashes(root, allowed)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    tb = "Traceback (most recent call last)" in err + out
    return Outcome(code, lines[-1] if lines else "", tb, changed, seconds)


def classify(case: Case, o: Outcome) -> str:
    names_it = all(any(alt in o.message for alt in n.split("|")) for n in case.names)
    if o.exit_code is None:
        return "hang"
    if o.changed:
        return "data loss"
    if o.traceback:
        return "traceback"
    if case.interrupt_after:
        return "correct" if o.exit_code == 130 and names_it else "misleading"
    if o.exit_code == 0:
        try:
            return "correct" if case.check is not None and case.check() else "silently wrong"
        except (OSError, KeyError, ValueError):  # the result to check is missing or unreadable
            return "silently wrong"
    return "refused" if names_it else "misleading"


# ----------------------------------------------------------------------------- hostile files


def finite(path: Path) -> bool:
    return all(t.isfinite().all() for t in load_file(str(path)).values())


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def with_value(src: Path, dst: Path, value: float) -> Path:
    """A copy of a safetensors file, one value replaced, written as another tool would (no content hash)."""
    with safe_open(str(src), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "content_sha256"}
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    tensors[sorted(tensors)[0]].view(-1)[0] = value
    save_file(tensors, str(dst), metadata=meta)
    return dst


def nifti_like(src: Path, dst: Path, value: float) -> Path:
    image = nib.load(src)
    nib.save(nib.Nifti1Image(np.full(image.shape, value, np.float32), image.affine), dst)
    return dst


def nan_block(ct: Path) -> None:
    image = nib.load(ct)
    data = np.asarray(image.dataobj, np.float32)
    data[10:20, 10:20, 10:20] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), ct)


def huge_header(src: Path, dst: Path) -> Path:
    """A .nii.gz whose header declares 10000^3 voxels over the few MB of the real volume."""
    real = nib.load(src)
    header = real.header.copy()
    header.set_data_shape((10000, 10000, 10000))
    raw = io.BytesIO()
    header.write_to(raw)
    blob = raw.getvalue().ljust(int(header.get_data_offset()), b"\0") + np.asanyarray(real.dataobj).tobytes()
    dst.write_bytes(gzip.compress(blob))
    return dst


def interrupted_run(base_run: Path, dst: Path) -> Path:
    """A copy of a run folder as Ctrl-C leaves it (no summary.json), its last.pt holding a pickled object."""
    shutil.copytree(base_run, dst)
    (dst / "summary.json").unlink()
    torch.save({"state": argparse.Namespace(epoch=1)}, dst / "last.pt")
    return dst


def one_center_data(data: Path, dst: Path, pet_value: float) -> Path:
    """MDA-001 and MDA-002 of ``data``, MDA-001's PET replaced by a constant."""
    for case in ("MDA-001", "MDA-002"):
        for name in (f"imagesTr/{case}__CT.nii.gz", f"imagesTr/{case}__PT.nii.gz", f"labelsTr/{case}.nii.gz"):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(data / name, dst / name)
    nifti_like(data / "imagesTr/MDA-001__PT.nii.gz", dst / "imagesTr/MDA-001__PT.nii.gz", pet_value)
    return dst


def split_file(dst: Path, chum: list[list[str]]) -> Path:
    """A split of CHUM (train, val, test as given) and MDA (001, 002, 003)."""
    centers = {"CHUM": dict(zip(("train", "val", "test"), chum)),
               "MDA": {"train": ["MDA-001"], "val": ["MDA-002"], "test": ["MDA-003"]}}
    dst.write_text(json.dumps({"seed": 0, "centers": centers}))
    return dst


def crafted_bank(bank: Path, dst: Path, center: str) -> Path:
    """A copy of a valid bank whose bank.json was edited by hand: the entry's center renamed."""
    shutil.copytree(bank, dst)
    index = json.loads((dst / "bank.json").read_text())
    index["entries"][0]["center"] = center
    (dst / "bank.json").write_text(json.dumps(index))
    return dst


# ----------------------------------------------------------------------------- the cases


def cases(w: Path) -> list[Case]:
    """Every case of the issue: its hostile inputs written under w/in/NAME, its outputs under w/out/NAME."""
    d, b, b2 = w / "data", w / "base/model.safetensors", w / "base2/model.safetensors"
    adapter, bank = w / "adapt/adapter.safetensors", w / "bank"
    ct, pet = d / "imagesTr/MDA-001__CT.nii.gz", d / "imagesTr/MDA-001__PT.nii.gz"

    def inp(name: str) -> Path:
        (w / "in" / name).mkdir(parents=True, exist_ok=True)
        return w / "in" / name

    def out(name: str) -> Path:
        (w / "out" / name).mkdir(parents=True, exist_ok=True)
        return w / "out" / name

    def predict(name: str, *extra: str, base: Path = b, pet_file: Path = pet) -> list[str]:
        return ["predict", "--base", str(base), "--ct", str(ct), "--pet", str(pet_file), *extra,
                "--out", str(out(name) / "p.nii.gz")]

    def pretrain(name: str, *extra: str, data: Path = d, epochs: int = 1) -> list[str]:
        """``epochs=300`` with no early stopping: runs until interrupted."""
        return ["pretrain", "--data", str(data), "--preset", "tiny", "--exclude-center", "MDA", "--epochs", str(epochs),
                *(["--patience", "0"] if epochs > 100 else []), *extra, "--out", str(out(name) / "run")]

    def adapt(name: str, *extra: str) -> list[str]:
        return ["adapt", "--data", str(d), "--center", "MDA", "--base", str(b), "--strategy", "deep", "--shots", "1",
                "--epochs", "1", *extra, "--out", str(out(name) / "run")]

    def add(name: str, center: str, *extra: str, adapter_file: Path = adapter) -> list[str]:
        return ["bank", "add", "--bank", str(out(name) / "bank"), f"--center={center}", "--adapter",
                str(adapter_file), *extra]

    def to(argv: list[str], new_out: Path | str) -> list[str]:
        return [*argv[:-1], str(new_out)]

    loss, wrong, mis, tb = "data loss", "silently wrong", "misleading", "traceback/hang"
    rows = [
        Case(loss, "onto-ct", "refused naming --ct", to(predict("onto-ct"), ct), (str(ct), "--ct")),
        Case(loss, "into-labels", "refused naming labelsTr",
             ["predict", "--base", str(b), "--input", str(d / "imagesTr"), "--out", str(d / "labelsTr")],
             ("labelsTr",)),
        Case(loss, "adapt-into-base", "refused: OUT holds --base", to(adapt("adapt-into-base"), b.parent),
             ("--base",)),
    ]
    for name, center in (("export-dotdot", "../../X"), ("export-absolute", str(w / "escaped"))):
        crafted = crafted_bank(bank, inp(name) / "bank", center)
        export = ["bank", "export", "--bank", str(crafted), "--base", str(b), "--out", str(out(name) / "bundles")]
        rows.append(Case(loss, name, f"refused naming {center!r} in bank.json", export, ("bank.json", center)))

    for what, value in (("zero", 0.0), ("constant", 1.3)):
        folder = one_center_data(d, inp(f"check-data-pet-{what}") / "data", value)
        flat = nifti_like(pet, inp(f"predict-pet-{what}") / "flat__PT.nii.gz", value)
        rows += [
            Case(wrong, f"check-data-pet-{what}", "exit 1, the PET named: no uptake", ["check-data", str(folder)],
                 ("no uptake", str(folder / "imagesTr/MDA-001__PT.nii.gz")), stream="stdout"),
            Case(wrong, f"predict-pet-{what}", "refused: PET has no uptake",
                 predict(f"predict-pet-{what}", pet_file=flat), ("no uptake", str(flat))),
        ]
    nan_model = with_value(b, inp("nan-checkpoint") / "model.safetensors", float("nan"))
    inf_adapter = with_value(adapter, inp("inf-adapter") / "adapter.safetensors", float("inf"))
    suv_nan = inp("preprocess-suv-nan") / "preprocess.json"
    suv_nan.write_text('{"suv_max": NaN}')
    twice = split_file(inp("split-train-and-test") / "splits.json", [["CHUM-001"], ["CHUM-002"], ["CHUM-001"]])
    foreign = split_file(inp("split-foreign-case") / "splits.json",
                         [["CHUM-001", "MDA-002"], ["CHUM-002"], ["CHUM-003"]])
    broken = inp("skip-bad-cases") / "data"
    shutil.copytree(d, broken)
    nan_block(broken / "imagesTr/CHUM-001__CT.nii.gz")
    rows += [
        Case(wrong, "adapt-lr-inf", "refused naming --lr", adapt("adapt-lr-inf", "--lr", "inf"), ("--lr",)),
        Case(wrong, "pretrain-lr-1e10", "stops naming --lr, or finite weights",
             pretrain("pretrain-lr-1e10", "--lr", "1e10", epochs=3), ("--lr",),
             check=lambda: finite(out("pretrain-lr-1e10") / "run/model.safetensors")),
        Case(wrong, "nan-checkpoint", "refused naming the file (NaN)", predict("nan-checkpoint", base=nan_model),
             (str(nan_model), "NaN")),
        Case(wrong, "inf-adapter-predict", "refused naming the adapter",
             predict("inf-adapter-predict", "--adapter", str(inf_adapter)), (str(inf_adapter),)),
        Case(wrong, "inf-adapter-bank-add", "refused naming the adapter",
             add("inf-adapter-bank-add", "MDA", adapter_file=inf_adapter), (str(inf_adapter),)),
        Case(wrong, "preprocess-suv-nan", "refused naming suv_max",
             predict("preprocess-suv-nan", "--preprocess", str(suv_nan)), ("suv_max",)),
        Case(wrong, "bank-add-other-base", "refused: adapter made for another backbone",
             add("bank-add-other-base", "MDA", "--base", str(b2), "--data", str(d)), ("backbone",)),
        Case(wrong, "split-train-and-test", "refused naming the file and CHUM-001",
             pretrain("split-train-and-test", "--splits", str(twice)), (str(twice), "CHUM-001")),
        Case(wrong, "split-foreign-case", "refused naming the file and MDA-002",
             pretrain("split-foreign-case", "--splits", str(foreign)), (str(foreign), "MDA-002")),
        Case(wrong, "skip-bad-cases", "exit 0, summary.json lists CHUM-001",
             pretrain("skip-bad-cases", "--skip-bad-cases", data=broken), ("CHUM-001",),
             check=lambda: "CHUM-001" in read(out("skip-bad-cases") / "run/summary.json")["splits"]["skipped_cases"]),
        Case(wrong, "out-empty", "refused naming --out", to(pretrain("out-empty"), ""), ("--out",)),
        Case(wrong, "out-inside-data", "refused naming --data", to(pretrain("out-inside-data"), d / "runs/x"),
             ("--data",)),
        Case(wrong, "two-writers", "second refused naming the first's pid", pretrain("two-writers"),
             ("pid {pid}", str(out("two-writers") / "run")), holder=pretrain("two-writers", epochs=300)),
    ]

    huge = huge_header(pet, inp("huge-header") / "huge__PT.nii.gz")
    loop = inp("symlink-loop") / "loop__PT.nii.gz"
    loop.symlink_to(loop.name)
    interrupted_run(b.parent, out("pickled-last-pt") / "run")  # --resume writes there: an output
    spacing, config = inp("preprocess-spacing-abc") / "preprocess.json", inp("bad-model-config") / "model.json"
    spacing.write_text('{"spacing": "abc"}')
    config.write_text('{"feature_size": 8}')
    blob = inp("binary-file") / "blob.json"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    rows += [
        Case(mis, "huge-header", "refused: declares 10000x10000x10000", predict("huge-header", pet_file=huge),
             (str(huge), "10000x10000x10000")),
        Case(mis, "symlink-loop", "refused: symbolic link loop", predict("symlink-loop", pet_file=loop),
             (str(loop), "loop")),
        Case(mis, "pickled-last-pt", "refused naming last.pt and Namespace", pretrain("pickled-last-pt", "--resume"),
             ("last.pt", "Namespace")),
        Case(mis, "other-base-adapter", "refused: adapter for another base",
             predict("other-base-adapter", "--adapter", str(adapter), base=b2), ("adapter", "backbone|base")),
        Case(mis, "preprocess-spacing-abc", "refused naming spacing",
             predict("preprocess-spacing-abc", "--preprocess", str(spacing)), ("spacing",)),
        Case(mis, "bad-model-config", "refused naming --model-config",
             predict("bad-model-config", "--model-config", str(config)), ("--model-config",)),
        Case(mis, "binary-profiles", "refused: not a text file",
             ["synth", "--out", str(out("binary-profiles") / "new"), "--centers", "NEW", "--profiles", str(blob)],
             (str(blob), "not a text file")),
        Case(mis, "binary-splits", "refused: not a text file", pretrain("binary-splits", "--splits", str(blob)),
             (str(blob), "not a text file")),
        Case(mis, "proc-out-pretrain", "refused naming /proc", to(pretrain("proc-out-pretrain"), "/proc/x"),
             ("/proc",)),
        Case(mis, "proc-out-predict", "refused naming /proc", to(predict("proc-out-predict"), "/proc/x/p.nii.gz"),
             ("/proc",)),
        Case(mis, "huge-seed", "refused naming --seed", pretrain("huge-seed", "--seed", "99999999999999999999999"),
             ("--seed",)),
    ]

    dash = shutil.copytree(bank, out("center-dash-add") / "bank")  # a valid bank, then add and remove "-x"
    rows += [
        Case(tb, "ctrl-c-pretrain", "exit 130, one line: interrupted ... --resume",
             pretrain("ctrl-c-pretrain", epochs=300), ("interrupted", "--resume"),
             interrupt_after="pretraining on"),
        Case(tb, "ctrl-c-predict", "exit 130, one line: interrupted",
             ["predict", "--base", str(b), "--input", str(d / "imagesTr"), "--tta", "--out",
              str(out("ctrl-c-predict") / "preds")], ("interrupted",), interrupt_after=" -> "),
        Case(tb, "num-prompts-100000", "refused naming --num-prompts",
             adapt("num-prompts-100000", "--num-prompts", "100000"), ("--num-prompts",)),
        Case(tb, "center-dash-add", "refused naming '-x'", add("center-dash-add", "-x"), ("-x", "center")),
        Case(tb, "center-dash-remove", "refused naming '-x' (or removed)",
             ["bank", "remove", "--bank", str(dash), "--center=-x"], ("-x",), writes=(dash,),
             check=lambda: "-x" not in [e["center"] for e in read(dash / "bank.json")["entries"]]),
    ]
    for name in ("BASE", "Auto"):
        rows.append(Case(tb, f"center-{name}", "refused: reserved name", add(f"center-{name}", name), (name,)))
    return rows


def setup(w: Path, logs: Path) -> None:
    """Dataset, two base models (seeds 0 and 1), a deep adapter for the first and a bank holding it."""
    (w / "cwd").mkdir(parents=True)
    d, b = w / "data", w / "base/model.safetensors"
    tiny = ["--preset", "tiny", "--exclude-center", "MDA", "--epochs", "1"]
    steps = [
        ["synth", "--out", str(d), "--centers", "CHUM,MDA", "--cases-per-center", "3"],
        ["pretrain", "--data", str(d), *tiny, "--out", str(w / "base")],
        ["pretrain", "--data", str(d), *tiny, "--seed", "1", "--out", str(w / "base2")],
        ["adapt", "--data", str(d), "--center", "MDA", "--base", str(b), "--strategy", "deep", "--num-prompts", "2",
         "--shots", "1", "--epochs", "1", "--out", str(w / "adapt")],
        ["bank", "add", "--bank", str(w / "bank"), "--center", "MDA", "--adapter", str(w / "adapt/adapter.safetensors"),
         "--base", str(b), "--data", str(d)],
    ]
    for i, argv in enumerate(steps):
        if finish(start(argv, w / "cwd", logs / f"setup{i}.err")) != 0:
            sys.exit(f"setup failed: centerprompt {' '.join(argv)}\n{(logs / f'setup{i}.err').read_text()}")


def shorten(text: str, root: Path, width: int = 160) -> str:
    text = text.replace(str(root), "$TMP").replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def report(rows: list[tuple[Case, Outcome, str]], root: Path, began: str, seconds: float) -> None:
    totals = Counter(outcome for _, _, outcome in rows)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown model")
    lines = [
        "# Hostile input, end to end", "",
        f"- date: {began}",
        f"- machine: {os.cpu_count()}-core CPU ({cpu}), OMP_NUM_THREADS=1, `--preset tiny`",
        f"- command: `python benchmarks/hostile.py` ({seconds / 60:.1f} min, {TIMEOUT_S} s per command)",
        "- totals: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())) + f", not run {len(NOT_RUN)}", "",
        "Each case is one `centerprompt` subprocess; `$TMP` is the temporary folder (data, base models, adapter,",
        "bank). The outcome follows from the exit code, the message, a traceback and the SHA-256 of every file",
        "outside the command's own output (see the docstring of benchmarks/hostile.py).", "",
        "| group | case | expected | exit | outcome | message |", "|---|---|---|---|---|---|",
    ]
    for case, o, outcome in rows:
        message = o.message + (f" [changed: {', '.join(o.changed)}]" if o.changed else "")
        code = "—" if o.exit_code is None else o.exit_code
        lines.append(f"| {case.group} | {case.name} | {shorten(case.expected, root)} | {code} | **{outcome}** "
                     f"| {shorten(message, root)} |")
    lines += ["", "Not run:", ""] + [f"- {name}: {why}" for name, why in NOT_RUN]
    lines += ["", "Commands:", ""] + [f"- {case.name}: `{shorten(command(case), root, 1000)}`" for case, _, _ in rows]
    (HERE / "hostile.md").write_text("\n".join(lines) + "\n")
    (HERE / "hostile.json").write_text(json.dumps({
        "date": began, "seconds": round(seconds), "totals": dict(totals), "not_run": dict(NOT_RUN),
        "cases": [{"group": case.group, "case": case.name, "expected": case.expected.replace(str(root), "$TMP"),
                   **asdict(o), "outcome": outcome, "command": command(case).replace(str(root), "$TMP"),
                   "message": o.message.replace(str(root), "$TMP"), "seconds": round(o.seconds, 1)}
                  for case, o, outcome in rows],
    }, indent=2) + "\n")


def command(case: Case) -> str:
    return " ".join(["centerprompt", *(a if a and " " not in a else repr(a) for a in case.argv)])


def main() -> None:
    began, t0 = subprocess.run(["date"], capture_output=True, text=True).stdout.strip(), time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="hostile-"))
    work, logs = root / "work", root / "logs"
    logs.mkdir()
    try:
        setup(work, logs)
        rows = []
        for case in cases(work):
            o = run(case, work, logs)
            rows.append((case, o, classify(case, o)))
            print(f"{rows[-1][2]:>15}  {case.name} ({o.exit_code}, {o.seconds:.0f} s): {shorten(o.message, work, 99)}",
                  flush=True)
        report(rows, work, began, time.monotonic() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {HERE / 'hostile.md'} and {HERE / 'hostile.json'}")


if __name__ == "__main__":
    main()
