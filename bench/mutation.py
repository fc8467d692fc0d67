"""Mutation testing with mutmut 3: do the fast tests catch small bugs in the core modules?

Not part of CI (it takes from minutes to hours). For each module below: a scratch copy of
src/, tests/ and pyproject.toml under build/mutation/<module>/ whose [tool.mutmut] section
is narrowed to that module and the fast tests that exercise it; `mutmut run` there (under
`nice -n 10`), then the count of mutants per status. The worktree itself is never touched.

    pip install -e ".[mutation]"                  # mutmut 3.8.1
    python3 bench/mutation.py                     # every module (long)
    python3 bench/mutation.py vectors gap         # some modules
    python3 bench/mutation.py hooks --survivors   # also list each surviving mutant
    python3 bench/mutation.py --keep vectors      # resume in build/mutation/vectors, with
                                                  # the worktree's tests copied in again

Then `cd build/mutation/<module> && mutmut show <name>` prints a mutant's diff, and
`mutmut browse` gives the interactive view. docs/testing.md records the counts and why
each remaining survivor is left alive.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / "build" / "mutation"
RAW_IDS = "disable_test_id_escaping_and_forfeit_all_rights_to_community_support = true\n"


@dataclass(frozen=True)
class Module:
    """One module under mutation: the file, the tests run against it, and which of its
    functions count (mutmut names a mutant `<module>.x_<function>__mutmut_<n>`)."""

    path: str
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ("*",)  # globs over function names; "*" = the whole file
    deselect: str = ""  # a pytest -k expression that drops slow parametrisations

    @property
    def dotted(self) -> str:
        return self.path.removeprefix("src/").removesuffix(".py").replace("/", ".")

    def name_globs(self) -> list[str]:
        """mutmut's mutant-name globs: `x_f__mutmut_*` for functions, `xǁC ǁm` for methods."""
        return [f"{self.dotted}.x*{f}__mutmut_*" for f in self.functions]


MODULES = {
    # the steer/record machinery (the decorated context managers themselves are not mutated
    # by mutmut 3, see docs/testing.md); the qwen/gemma2 parametrisations of the model tests
    # are dropped for time (llama and gemma3_text remain), and gpt2's except its fused-qkv
    # test (the only family whose q/k/v are channel slices of one projection)
    "hooks": Module(
        "src/steerdiff/hooks.py",
        ("tests/test_hooks.py", "tests/test_mutants_hooks.py"),
        deselect="(not gpt2 or qkv) and not qwen2 and not qwen3 and not gemma2",
    ),
    "vectors": Module(
        "src/steerdiff/vectors.py", ("tests/test_vectors.py", "tests/test_mutants_vectors.py")
    ),
    # the published numbers filter (tasks/numbers_filter.py since issue 12: the whole file)
    "numbers": Module(
        "src/steerdiff/tasks/numbers_filter.py",
        ("tests/test_numbers.py", "tests/test_mutants_numbers.py"),
    ),
    # the gap-closed figures, their noise flag and their bootstrap interval
    "gap": Module(
        "src/steerdiff/fit/losses.py",
        (
            "tests/test_train.py::test_gap_interval_brackets_the_truth_and_narrows_with_rows",
            "tests/test_train.py::test_reported_val_losses_equal_a_hand_computation",
            "tests/test_train.py::test_distill_and_grad_accumulation_equal_big_batch",
            "tests/test_fit_data.py::test_gap_within_noise_is_the_reports_rule",
            "tests/test_mutants_losses.py",
        ),
        functions=(
            "gap_within_noise",
            "gap_closed",
            "gap_interval",
            "gap_figures",
            "result_figures",
        ),
    ),
}


def mutmut_section(mod: Module, tests: list[str]) -> str:
    """The [tool.mutmut] section of the scratch copy's pyproject.toml."""
    args = ["-p", "no:cacheprovider", "-x", "-q", "-m", "not slow"]
    if mod.deselect:
        args += ["-k", mod.deselect]
    return (
        "[tool.mutmut]\n"
        'source_paths = ["src/"]\n'
        f"only_mutate = [{json.dumps(mod.path)}]\n"
        f"pytest_add_cli_args = {json.dumps(args)}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
        # torch's thread pools are not fork-safe: fork each mutant from a clean server
        'process_isolation = "forkserver"\n'
    )


def prepare(name: str, mod: Module, keep: bool) -> Path:
    """build/mutation/<name>: src/, tests/ and pyproject.toml with the narrowed section."""
    work = SCRATCH / name
    if work.exists() and not keep:
        shutil.rmtree(work)
    if not work.exists():
        work.mkdir(parents=True)
        shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__"))
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "tests", work / "tests", ignore=skip, dirs_exist_ok=True)
    tests = [t for t in mod.tests if (work / t.split("::")[0]).exists()]
    text = (ROOT / "pyproject.toml").read_text()
    text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text)  # the shared section
    # mutmut selects tests by node id on pytest's command line, where the ids pytest escapes
    # (a parameter "\\n" or "\\u0661") are not found: keep ids unescaped in the copy
    text = text.replace("[tool.pytest.ini_options]\n", "[tool.pytest.ini_options]\n" + RAW_IDS)
    (work / "pyproject.toml").write_text(text.rstrip() + "\n\n" + mutmut_section(mod, tests))
    return work


def results(work: Path, mod: Module) -> dict[str, str]:
    """Mutant name -> status ('killed', 'survived', 'no tests', 'timeout', ...)."""
    out = subprocess.run(
        ["mutmut", "results", "--all", "true"], cwd=work, capture_output=True, text=True
    ).stdout
    status = {}
    for line in out.splitlines():
        name, _, st = line.strip().rpartition(": ")
        if name.startswith(mod.dotted + "."):
            status[name] = st
    globs = [re.compile(re.escape(g).replace(r"\*", ".*") + "$") for g in mod.name_globs()]
    return {k: v for k, v in status.items() if any(g.match(k) for g in globs)}


def run_module(name: str, mod: Module, keep: bool, survivors: bool) -> dict[str, int]:
    if not (ROOT / mod.path).exists():
        print(f"{name:8s} {mod.path}: not found, skipped", flush=True)
        return {}
    work = prepare(name, mod, keep)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mutmut sets the path
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = ["nice", "-n", "10", "mutmut", "run", "--max-children", "2", *mod.name_globs()]
    if mod.functions == ("*",):
        cmd = cmd[: -len(mod.name_globs())]  # the whole file: no filter
    t0 = time.time()
    log = work / "mutmut.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    status = results(work, mod)
    counts: dict[str, int] = {}
    for st in status.values():
        counts[st] = counts.get(st, 0) + 1
    print(
        f"{name:8s} {mod.path}: {len(status)} mutants, "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"  ({time.time() - t0:.0f} s; mutmut exit {rc}; log {log.relative_to(ROOT)})",
        flush=True,
    )
    if survivors:
        for k in sorted(k for k, v in status.items() if v != "killed"):
            print(f"    {status[k]:10s} {k}")
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help=f"some of {', '.join(MODULES)} (default: all)")
    ap.add_argument("--keep", action="store_true", help="re-use the scratch copy (resume)")
    ap.add_argument("--survivors", action="store_true", help="list the mutants not killed")
    args = ap.parse_args()
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        print(f"error: unknown module(s) {unknown}; choose from {list(MODULES)}", file=sys.stderr)
        return 2
    if shutil.which("mutmut") is None:
        print(
            'error: mutmut is not installed; `pip install -e ".[mutation]"` (mutmut 3.8.1)',
            file=sys.stderr,
        )
        return 2
    for name in args.modules or list(MODULES):
        run_module(name, MODULES[name], args.keep, args.survivors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
