"""The runner: runs each enabled stage of the registry, or skips it when its result is already there.

A stage is built in a hidden staging folder (``edge_kd.fileio.staging_dir``), swapped into place
(``swap_dir``) when it is done, and only then recorded in ``manifests/<stage>.json``: the
fingerprint of its settings, of the recipe parts it depends on, of its inputs (the manifests of the
stages it reads) and of its code, with the sha256 of every file it wrote. A rerun skips a stage
whose manifest matches and whose files still hash as recorded; anything else (a changed setting,
input or source file, a missing or altered file, a stage killed at any moment) reruns that stage
and every stage that reads from it. Whatever a killed run left behind is cleaned at the next start.

A stage that trains saves its state after each epoch in ``.resume/<stage>/`` (``edge_kd.train.EpochCheckpoints``,
keyed by the stage's fingerprint): a stage killed or interrupted mid-training reruns from the epoch it had
reached, not from its start, and gives what an uninterrupted run would have. A finished stage removes it. Its
manifest's ``seconds`` are those of every sitting: this one's, and the saved work of those stopped before.

In a multi-worker job (``training.strategy: multi_worker``, ``pipelines.multiworker``) every worker walks the same
stages: the chief decides each training stage's fate from its run folder and sends the others what they lack (the
results of the earlier stages the stage reads, its saved epochs), every worker trains it in step, and the chief
alone runs the stages that do not train. The other workers write into their scratch folder only.

Runs that share a ``store`` folder (the candidates of ``pipelines.search``) share their stages: a stage
one run finished is copied into the store under its fingerprint, and another run whose stage has that
very fingerprint (the same settings, recipe parts, inputs and code) takes it from there instead of
running it. Stages whose result names its run (``Stage.shareable`` false) are never shared.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from edge_kd import interrupt
from edge_kd.errors import UserError
from edge_kd.fileio import clean_leftovers, sha256_file, staging_dir, swap_dir, write_json
from pipelines import codehash, multiworker, run_training
from pipelines.context import Context
from pipelines.fingerprint import fingerprint


@dataclasses.dataclass
class StageRecord:
    """What happened to one stage in a run."""

    stage: str
    skipped: bool
    #: what the stage took when it ran here, over every sitting (0 when skipped or shared)
    seconds: float = 0.0
    #: taken from the store (finished by another run) rather than found in this run's folder
    shared: bool = False
    #: of ``seconds``, those of earlier sittings (the saved epochs of the stage resumed here)
    earlier: float = 0.0


def stage_fingerprint(ctx: Context, name: str) -> str:
    """Returns the hash of everything stage ``name``'s result depends on (its stages read must be done)."""
    stage = ctx.stages[name]
    settings = ctx.settings(name)
    key = {"stage": name, "settings": settings.model_dump(), "key": stage.key(ctx),
           "code": codehash.code_hash(stage_modules(stage, ctx)),
           # what an input stage wrote, not only how it was configured: a rerun of it that wrote
           # other bytes (training is not bit-reproducible) makes this stage rerun too
           "inputs": {d: fingerprint([ctx.manifests[d]["fingerprint"], ctx.manifests[d]["files"]])
                      for d in stage.reads(ctx)}}
    return fingerprint(key)


def stage_modules(stage, ctx=None) -> list[str]:
    """Returns the modules whose closure is a stage's code: its own module, which imports what the stage runs, and
    for a stage that distils (in ``ctx``'s recipe) the modules of its loss terms (``edge_kd.distill.soft_targets``,
    ...), which it reaches through the recipe rather than an import."""
    modules = [type(stage).__module__]
    if ctx is not None and ctx.recipe.distils(stage.name):
        modules += sorted({type(t).__module__ for t in ctx.recipe.distillation.build_terms()})
    return modules


def read_manifest(path: Path) -> dict | None:
    """Returns the stage manifest at ``path``, or None where there is none or it is unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Returns the seconds each finished stage of the run folder ``run_dir`` recorded, by stage: over every sitting
    it took (a stopped stage's saved epochs count), and for a stage taken from a store, those of the run that made
    it."""
    manifests = (read_manifest(m) for m in sorted((Path(run_dir) / "manifests").glob("*.json")))
    return {m["stage"]: float(m.get("seconds", 0.0)) for m in manifests if m and "stage" in m}


def seconds_before(run_dir: Path, records: list[StageRecord]) -> float:
    """Returns what the stages of the run in ``run_dir`` cost outside the invocation that gave ``records``: the
    stages it skipped (finished by an earlier invocation, or taken from a store: their recorded seconds) and the
    earlier sittings of those it resumed. Added to that invocation's wall time, the run's whole cost."""
    recorded = stage_seconds(run_dir)
    return sum(recorded.get(r.stage, 0.0) if r.skipped else r.earlier for r in records)


def is_finished(folder: Path, manifest_path: Path, expected_fingerprint: str) -> dict | None:
    """Returns the manifest if the stage in ``folder`` finished with ``expected_fingerprint`` and its files are intact."""
    m = read_manifest(manifest_path)
    if not m or m.get("fingerprint") != expected_fingerprint:
        return None
    for rel, digest in m.get("files", {}).items():
        f = folder / rel
        if not f.is_file() or sha256_file(f) != digest:
            return None
    return m


def _store_entry(store: Path, name: str, fp: str) -> Path:
    return Path(store) / f"{name}-{fp[:32]}"


def take_from_store(store: Path, name: str, fp: str, folder: Path, manifest_path: Path) -> dict | None:
    """Puts the stored result of stage ``name`` with fingerprint ``fp`` in ``folder``; returns its manifest, or None
    when the store has no intact one."""
    entry = _store_entry(store, name, fp)
    manifest = is_finished(entry / "files", entry / "manifest.json", fp)
    if manifest is None:
        return None
    work = staging_dir(folder)
    _link_tree(entry / "files", work)
    swap_dir(work, folder)
    manifest = {**manifest, "taken_from_store": True}  # the run folder says which stages it did not make itself
    write_json(manifest_path, manifest)
    return manifest


def put_in_store(store: Path, name: str, folder: Path, manifest: dict) -> None:
    """Adds a finished stage to the store, unless an intact copy is there (whole or not at all: built aside, then
    swapped into place)."""
    entry = _store_entry(store, name, manifest["fingerprint"])
    if is_finished(entry / "files", entry / "manifest.json", manifest["fingerprint"]) is not None:
        return
    work = staging_dir(entry)
    _link_tree(folder, work / "files")
    write_json(work / "manifest.json", {k: v for k, v in manifest.items() if k != "taken_from_store"})
    swap_dir(work, entry)  # replaces a damaged copy


def _link_tree(src: Path, dst: Path) -> None:
    """Copies folder ``src`` to ``dst`` as hard links where the file system allows (stage files are never
    changed in place: a stage that reruns replaces its whole folder)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)


def _reads_all(ctx: Context, name: str) -> list[str]:
    """Returns the stages whose files stage ``name`` reads, directly or through the stages it reads."""
    found, todo = [], list(ctx.stages[name].reads(ctx))
    while todo:
        d = todo.pop()
        if d not in found:
            found.append(d)
            todo.extend(ctx.stages[d].reads(ctx))
    return found


def _for_workers(ctx: Context, name: str, fp: str, held: set) -> dict:
    """Returns the files (path in the run folder: file) the other workers of a job lack to run stage ``name`` with
    fingerprint ``fp`` as the chief does: the results (and manifests) of the stages it reads that they do not hold
    (``held``, which grows by those), and the epochs of it saved so far."""
    files = {}
    for d in _reads_all(ctx, name):
        if d in held:
            continue
        held.add(d)
        for path in [*sorted(ctx.stage_dir(d).rglob("*")), ctx.manifest_path(d)]:
            if path.is_file():
                files[path.relative_to(ctx.run_dir).as_posix()] = path
    saved = ctx.epoch_checkpoints(name, fp)
    if saved.epochs_done():
        for path in sorted(saved.folder.rglob("*")):
            if path.is_file():
                files[path.relative_to(ctx.run_dir).as_posix()] = path
    return files


def _resume_line(name: str, saved: int) -> str:
    if saved:
        return (f"its finished epochs are kept: start the same command on every worker again to resume stage "
                f"'{name}' after its epoch {saved}")
    return f"start the same command on every worker again to run stage '{name}' (no epoch of it had finished)"


def _forget_epochs(ctx: Context, resume) -> None:
    """Removes a finished stage's saved epochs, and ``.resume`` itself once no stage is part-way."""
    resume.clear()
    with contextlib.suppress(OSError):
        ctx.resume_root().rmdir()


def run_stages(ctx: Context, stream=None, store: Path | None = None) -> list[StageRecord]:
    """Runs (or skips, when finished and unchanged) every enabled stage; returns one record per stage.

    With ``store``, a stage another run finished with the same fingerprint is taken from there, and each stage
    this run finishes is put there.
    """
    stream = stream or sys.stdout
    names = ctx.enabled()
    job = ctx.cluster  # a multi-worker job, or None
    lead = job is None or job.is_chief  # this process decides, from the run folder
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    clean_leftovers(ctx.run_dir)
    if store is not None:
        Path(store).mkdir(parents=True, exist_ok=True)
        clean_leftovers(store)
    trained = [n for n in names if ctx.stages[n].trains] if job is not None else []
    held: set[str] = set()  # the stages whose results the other workers of the job hold
    records = []
    for i, name in enumerate(names, 1):
        stage = ctx.stages[name]
        folder = ctx.stage_dir(name)
        label = f"[{i}/{len(names)}] {name}"
        if not lead and not stage.trains:
            print(f"{label}: left to the chief, {job.name(0)}", file=stream, flush=True)
            records.append(StageRecord(name, skipped=True))
            continue
        if lead:
            fp = stage_fingerprint(ctx, name)
            manifest = is_finished(folder, ctx.manifest_path(name), fp)
            if job is not None and stage.trains:  # the others skip it, or train it from what this run folder holds
                job.decide(name, fp, manifest is not None, {} if manifest else _for_workers(ctx, name, fp, held))
        else:
            fp, finished = job.follow(name, ctx.run_dir)
            manifest = {"stage": name, "fingerprint": fp} if finished else None
            for d in names:  # the manifests of the stages the chief sent
                if d not in ctx.manifests and (m := read_manifest(ctx.manifest_path(d))) is not None:
                    ctx.manifests[d] = m
        if manifest is not None:
            print(f"{label}: finished earlier with the same settings, inputs and code, skipped", file=stream,
                  flush=True)
            _forget_epochs(ctx, ctx.epoch_checkpoints(name, fp))  # a run killed after the manifest, before they went
            ctx.manifests[name] = manifest
            if store is not None and stage.shareable:  # a run killed between its manifest and the store
                put_in_store(store, name, folder, manifest)
            records.append(StageRecord(name, skipped=True))
            if trained and name == trained[-1]:
                job.release()
            continue
        if store is not None and stage.shareable:
            manifest = take_from_store(store, name, fp, folder, ctx.manifest_path(name))
            if manifest is not None:
                print(f"{label}: finished by another run with the same settings, inputs and code, taken from "
                      f"{store}", file=stream, flush=True)
                ctx.manifests[name] = manifest
                records.append(StageRecord(name, skipped=True, shared=True))
                continue
        resume = ctx.begin_stage(name, fp)
        done = resume.epochs_done()
        unit = stage.resume_unit(ctx.recipe)
        print(f"{label}: {stage.title(ctx.recipe)}{f' (resumed after {unit} {done})' if done else ''} ...",
              file=stream, flush=True)
        interrupt.at(f"stage '{name}'")
        work = staging_dir(folder)
        earlier = resume.earlier  # the seconds of the earlier sittings' saved epochs count too (begin_stage)
        try:
            with run_training.scope(ctx, stage):  # training.strategy's scope, for the stages that train
                summary = stage.run(ctx, work)
            interrupt.check()  # a Ctrl-C swallowed during the stage: its result is not recorded
        except BaseException as e:
            shutil.rmtree(work, ignore_errors=True)
            # a Ctrl-C, or whatever error a library made of it where it arrived
            if isinstance(e, KeyboardInterrupt) or interrupt.requested():
                saved = resume.epochs_done()
                raise interrupt.Interrupted(f"stage '{name}'",
                                            f"'{name}'" + (f", after its {unit} {saved}" if saved else "")) from None
            if job is not None and multiworker.is_lost(e):  # another worker died or stopped answering
                raise job.lost(e, f"stage '{name}'", _resume_line(name, resume.epochs_done())) from None
            if isinstance(e, UserError):
                raise UserError(f"stage '{name}': {e}") from None
            raise
        finally:
            interrupt.at(None)
        seconds = resume.seconds()
        files = {p.relative_to(work).as_posix(): sha256_file(p) for p in sorted(work.rglob("*")) if p.is_file()}
        manifest = {"stage": name, "fingerprint": fp, "seconds": round(seconds, 2), "summary": summary,
                    "files": files, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        swap_dir(work, folder)
        # Written last: a kill before this leaves no manifest, or an older one whose hashes no longer match.
        write_json(ctx.manifest_path(name), manifest)
        _forget_epochs(ctx, resume)  # the finished stage replaces them
        ctx.manifests[name] = manifest
        if store is not None and stage.shareable:
            put_in_store(store, name, folder, manifest)
        records.append(StageRecord(name, skipped=False, seconds=seconds, earlier=earlier))
        if stage.trains:  # every worker trained it, each into its own folder
            held.add(name)
        before = f" ({earlier:.1f} s of it in earlier sittings)" if earlier else ""
        print(f"{label}: done in {seconds:.1f} s{before}", file=stream, flush=True)
        if trained and name == trained[-1]:
            job.release()
    if lead:
        for name in names:
            ctx.stages[name].publish(ctx)
    return records
