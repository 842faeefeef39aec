"""Plan: the spec, its input shards and what the output already holds, checked before any
model loads, so that `validate`, `--dry-run` and `run` refuse the same things."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.checkpoint import Checkpoint, resolve
from pipeline.io.output import OutputStore
from pipeline.io.shard_column import SHARD_COLUMN
from pipeline.io.shards import InputError, Shard, check_shards, open_shards, resolve_filesystem, unreadable
from pipeline.io.store_retry import StoreUnavailableError
from pipeline.spec import JobSpec, SpecError, result_settings, spec_changes
from pipeline.weights import changes as weight_changes

CHOICES = ("use another output path, pass --overwrite to replace it, or --resume-anyway to keep "
           "its committed shards and run only the others")


@dataclass(frozen=True)
class RetrySelection:
    """Committed rows a `--retry-errors` run computes again: every error row, or the result
    and error rows whose column holds one of the given values (any condition may match)."""

    where: tuple[tuple[str, tuple[str, ...]], ...] = ()
    all_errors: bool = True

    @classmethod
    def parse(cls, conditions: list[str], *, all_errors: bool = False) -> RetrySelection:
        """From --retry-where COLUMN=V1,V2 conditions; all_errors (--retry-errors) adds every
        error row; with no condition at all, every error row is selected."""
        where = []
        for c in conditions:
            column, sep, values = c.partition("=")
            if not sep or not column.strip() or not values:
                raise SpecError(f"--retry-where {c!r}: write COLUMN=VALUE[,VALUE...], e.g. "
                                f"--retry-where finish_reason=length or --retry-where error_type=engine_timeout")
            where.append((column.strip(), tuple(v.strip() for v in values.split(","))))
        return cls(tuple(where), all_errors=all_errors or not where)

    def describe(self) -> str:
        return " or ".join((["every error row"] if self.all_errors else [])
                           + [f"{c} in {list(v)}" for c, v in self.where])

    def ids(self, table: pa.Table | None, *, errors: bool) -> pa.Array | None:
        """Ids of the rows of a committed table (results or errors) this selection picks."""
        import pyarrow.compute as pc

        if table is None or table.num_rows == 0:
            return None
        if errors and self.all_errors:
            return table.column("id").combine_chunks()
        mask = None
        for column, values in self.where:
            if column in table.column_names:
                hit = pc.is_in(table.column(column).cast(pa.string()), value_set=pa.array(values))
                mask = hit if mask is None else pc.or_(mask, hit)
        return table.column("id").filter(pc.fill_null(mask, False)).combine_chunks() if mask is not None else None


@dataclass
class Plan:
    """What a run will do, known before any model loads."""

    spec: JobSpec
    input_fs: object = field(repr=False)
    shards: list[Shard]
    id_type: pa.DataType
    columns: list[str]  # columns read from the shards
    done: list[str]  # shards committed by an earlier run: skipped
    kept: list[dict]  # committed shards of another spec or older input, kept by --resume-anyway
    orphaned: list[str]  # committed shards whose input file is gone
    last_run: dict | None = field(default=None, repr=False)  # the manifest found, if any
    retry: RetrySelection | None = None
    redo: dict[str, pa.Array] = field(default_factory=dict, repr=False)  # committed shard -> ids to redo
    records: dict[str, dict] = field(default_factory=dict, repr=False)  # commit records found
    checkpoint: Checkpoint | None = field(default=None, repr=False)  # config, kind, head: read once
    results_schema: pa.Schema | None = field(default=None, repr=False)  # the job's results columns
    moved: dict[str, str] = field(default_factory=dict)  # shard -> the orphaned record of its content

    @property
    def head(self):
        """The job's head for its checkpoint, with its options and sampling."""
        return self.checkpoint.head

    @property
    def weights(self) -> dict | None:
        """The content identity of the checkpoint and adapters (pipeline.weights), if known."""
        return self.checkpoint.weights if self.checkpoint else None

    @property
    def todo(self) -> list[Shard]:
        done = set(self.done)
        return [s for s in self.shards if s.name not in done]

    @property
    def work(self) -> list[Shard]:
        """Shards this run reads: those to run whole, then those with rows to redo."""
        return self.todo + [s for s in self.shards if s.name in self.redo]

    def rows_to_run(self, shard: Shard) -> int:
        return len(self.redo[shard.name]) if shard.name in self.redo else shard.rows


def plan_job(spec: JobSpec, *, overwrite: bool = False, resume_anyway: bool = False,
             retry: RetrySelection | None = None) -> Plan:
    """Check the spec, the inputs and the output folder; raises SpecError or InputError.

    resume_anyway keeps shards committed by a run of another spec, or from since-changed
    input files, and plans only the rest.
    """
    if overwrite and resume_anyway:
        raise SpecError("--overwrite and --resume-anyway contradict each other; pick one")
    if retry is not None and overwrite:
        raise SpecError("--retry-errors redoes rows of committed shards; --overwrite removes them: pick one")
    checkpoint = resolve(spec)
    head = checkpoint.head
    _check_output_outside_input(spec)
    fs, shards = open_shards(spec.input.path)
    reads = head.input_columns() + ([spec.model.adapter_column] if spec.model.adapters else [])
    check_shards(fs, shards, id_column=spec.input.id_column, any_of=head.required_any(), reads=reads)
    for column in head.required_all():
        lacking = [s for s in shards if column not in s.schema.names]
        if lacking:
            more = f" ({len(lacking)} shards lack it)" if len(lacking) > 1 else ""
            raise InputError(f"{lacking[0].path}: no column '{column}' (columns: "
                             f"{', '.join(lacking[0].schema.names)}), which head '{spec.task.head}' reads from "
                             f"every row; add it or set the head's column option{more}")
    clash = [c for c in [spec.input.id_column] + reads if c == SHARD_COLUMN]
    if clash:
        raise InputError(f"the job reads a column named '{SHARD_COLUMN}', which Ray Data overwrites "
                         f"with each row's file name; rename that column (or the head's column option)")
    id_type = shards[0].schema.field(spec.input.id_column).type
    columns = [spec.input.id_column] + [c for c in reads if c in shards[0].schema.names]
    plan = Plan(spec, fs, shards, id_type, columns, [], [], [], retry=retry, checkpoint=checkpoint,
                results_schema=head.result_schema(id_type))
    read_output_state(plan, overwrite=overwrite, resume_anyway=resume_anyway)
    return plan


def read_output_state(plan: Plan, *, overwrite: bool = False, resume_anyway: bool = False) -> None:
    """Fill in what the output already holds (done, kept, orphaned shards, the last run).
    A run calls it again once it holds the output's lock."""
    spec = plan.spec
    store = OutputStore(spec.output.path)
    try:
        records, last_run = ({}, None) if overwrite else (store.records(), store.read_manifest())
        legacy = [] if overwrite else store.legacy_files()
    except StoreUnavailableError:  # transient, retried already: exit 3 (a rerun resumes), not 2
        raise
    except OSError as e:
        raise InputError(f"output.path {spec.output.path} cannot be read: {e}") from None
    if legacy:
        raise InputError(f"output.path {spec.output.path} holds results in the layout of an older "
                         f"qwen-batch ({legacy[0]}, without commit records); {CHOICES}")
    weights = plan.weights
    plan.done, plan.kept = _committed(spec, plan.shards, records, last_run, strict=not resume_anyway,
                                      any_spec=plan.retry is not None, weights=weights)
    names = {s.name for s in plan.shards}
    plan.orphaned = sorted(n for n in records if n not in names)
    plan.moved = _renamed(plan, records, strict=not resume_anyway and plan.retry is None)
    plan.done += list(plan.moved)
    plan.orphaned = [n for n in plan.orphaned if n not in plan.moved.values()]
    if plan.orphaned and plan.todo and not overwrite:
        _refuse_ids_committed_elsewhere(plan, store, records)
    plan.last_run, plan.records = last_run, records
    if plan.retry is not None:
        plan.redo = _rows_to_redo(store, records, plan.done, plan.retry)


def _rows_to_redo(store: OutputStore, records: dict[str, dict], done: list[str],
                  retry: RetrySelection) -> dict[str, pa.Array]:
    """Per committed shard, the ids of the rows the selection picks (read column by column)."""
    import pyarrow.parquet as pq

    columns = {c for c, _ in retry.where}
    redo = {}
    for name in done:
        picked = []
        for kind in ("results", "errors"):
            if kind == "results" and not columns:
                continue  # every error row: results are not read
            for rel in records[name]["files"][kind]:
                with store.fs.open_input_file(store.abs(rel)) as f:
                    schema = pq.read_schema(f)
                    f.seek(0)
                    wanted = ["id"] + sorted(columns & set(schema.names)) if columns else ["id"]
                    ids = retry.ids(pq.read_table(f, columns=wanted), errors=kind == "errors")
                if ids is not None and len(ids):
                    picked.append(ids)
        if picked:
            redo[name] = pa.concat_arrays(picked)
    return redo


def _renamed(plan: Plan, records: dict[str, dict], *, strict: bool) -> dict[str, str]:
    """Input files renamed or moved since their shard was committed: new shard name -> the
    orphaned record of the same content (size, rows, footer) and spec. The run moves each
    record to the new name instead of computing its rows again."""
    fingerprints = plan.spec.fingerprints()
    weights = plan.weights
    orphans = {n: records[n] for n in plan.orphaned}
    moved = {}
    for s in plan.todo:
        for name, r in orphans.items():
            same_spec = r.get("spec_fingerprint") in fingerprints or not strict
            same_weights = not strict or not weight_changes(r.get("weights"), weights)
            if name not in moved.values() and same_spec and same_weights and _same_input(r.get("input"),
                                                                                          s.fingerprint()):
                moved[s.name] = name
                break
    return moved


def _refuse_ids_committed_elsewhere(plan: Plan, store: OutputStore, records: dict[str, dict]) -> None:
    """Raise InputError when a shard to run holds ids committed under an orphaned shard (an
    input re-exported under new part names): running it would put those ids in the output
    twice. Reads only id columns."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipeline.io.shards import read_columns

    committed = []
    for name in plan.orphaned:
        for kind in ("results", "errors"):
            for rel in records[name]["files"][kind]:
                with store.fs.open_input_file(store.abs(rel)) as f:
                    ids = pq.read_table(f, columns=["id"]).column("id")
                committed.append((name, ids))
    if not committed:
        return
    id_type = plan.id_type
    for s in plan.todo:
        mine = read_columns(plan.input_fs, s, [plan.spec.input.id_column]).column(0)  # Parquet or JSON lines
        for name, ids in committed:
            if ids.type != id_type:
                continue
            hit = pc.filter(ids, pc.is_in(ids, value_set=mine.combine_chunks()))
            if len(hit):
                raise InputError(
                    f"input shard {s.path} holds {len(hit)} id(s) (e.g. {hit[0].as_py()!r}) already committed in "
                    f"{plan.spec.output.path} under shard {name}, whose input file is gone (renamed or "
                    f"re-exported under new names?). Running it would give those ids twice. Give the file "
                    f"its old name back ({name}) to keep the committed rows, or pass --overwrite to run "
                    f"every shard again")


def _same_input(a: dict | None, b: dict) -> bool:
    """Same content (size, rows, footer hash), wherever the file is now."""
    keys = ("size", "rows", "footer")
    return a is not None and all(a.get(k) == b.get(k) for k in keys)


def _committed(spec: JobSpec, shards: list[Shard], records: dict[str, dict], last_run: dict | None,
               *, strict: bool, any_spec: bool = False,
               weights: dict | None = None) -> tuple[list[str], list[dict]]:
    """(names of shards already done, committed shards kept despite another spec, input or
    weights: pipeline.weights.job_weights of the job now).

    A shard kept by --resume-anyway stays accepted in later runs of the same spec while its
    input does not change again (the manifest lists it). A shard some of whose rows were
    redone with this spec (--retry-errors) counts as this spec's; any_spec accepts every
    spec (a --retry-errors run may change it)."""
    fingerprint, fingerprints = spec.fingerprint(), spec.fingerprints()
    accepted = {k["name"]: k for k in (last_run or {}).get("kept", [])}
    done, kept = [], []
    for s in shards:
        record = records.get(s.name)
        if record is None:
            continue
        why = []
        specs = {record.get("spec_fingerprint")} | {r.get("spec_fingerprint") for r in record.get("redone", [])}
        if not fingerprints & specs and not any_spec:
            why.append("committed by a run of a different job spec" + _changed_settings(spec, last_run))
        if not _same_input(record.get("input"), s.fingerprint()):
            why.append(f"input shard {s.path} changed since it was processed")
        changed = [] if any_spec else weight_changes(record.get("weights"), weights)
        if changed:
            why.append(f"committed with other weights: {' and '.join(changed)} changed since (same path, "
                       f"other content)")
        if why:
            ok = accepted.get(s.name)
            if strict and not (ok and ok.get("spec") in fingerprints and _same_input(ok.get("input"), s.fingerprint())
                               and not weight_changes(ok.get("weights"), weights)):
                raise InputError(f"output.path {spec.output.path}: shard {s.name} was {' and '.join(why)}; {CHOICES}")
            kept.append({"name": s.name, "why": "; ".join(why), "spec": fingerprint, "input": s.fingerprint(),
                         "weights": weights})
        done.append(s.name)
    return done, kept


def _changed_settings(spec: JobSpec, last_run: dict | None) -> str:
    """' (changed since the last run: key: old -> new, ...)' for the settings that change result
    rows, when the last run's manifest holds its spec; else ''."""
    from pipeline.redact import redact

    before = (last_run or {}).get("spec")
    if not before:
        return ""
    changes = spec_changes(result_settings(before), result_settings(redact(spec.model_dump(mode="json"))))
    return f" (changed since the last run: {'; '.join(changes[:5])})" if changes else ""


def _check_output_outside_input(spec: JobSpec) -> None:
    try:  # the input first: an input that cannot be reached is said as open_shards says it
        _, inp = resolve_filesystem(spec.input.path.split("*")[0])
    except StoreUnavailableError:
        raise
    except (OSError, pa.ArrowInvalid) as e:
        raise unreadable(spec.input.path, e) from None
    try:
        _, out = resolve_filesystem(spec.output.path)
    except StoreUnavailableError:  # the store kept failing: exit 3, not the spec's fault
        raise
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"output.path {spec.output.path} cannot be reached: {e}. Check the path, the "
                         f"credentials and the network; nothing ran") from None
    inp = inp.rstrip("/")
    if out == inp or out.startswith(inp + "/"):
        raise InputError(f"output.path {spec.output.path} is inside input.path {spec.input.path}; "
                         f"the next run would read its own output. Choose a folder outside the input")


def token_counter(source: str, trust_remote_code: bool = False):
    """text -> its token count (no special tokens added). A local checkpoint's tokenizer.json is
    read by the tokenizers library itself: importing transformers costs the driver seconds."""
    import os

    local = os.path.join(source, "tokenizer.json")
    if os.path.isfile(local):
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(local)
        return lambda text: len(fast.encode(text, add_special_tokens=False).ids)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if not tokenizer.encode("hello", add_special_tokens=False):  # built from config.json alone: no vocabulary
        raise OSError(f"no tokenizer files for {source} (tokenizer.json, or vocab.json and merges.txt)")
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def estimate_input_tokens(plan: Plan, *, sample_rows: int = 256) -> tuple[int, int]:
    """(estimated text tokens of the input, rows sampled): the tokenizer's count over a sample
    of rows from up to 16 shards, scaled to all rows. Chat templates add a few tokens a row."""
    import pyarrow.parquet as pq

    from pipeline.io.shards import PARQUET, read_columns

    spec = plan.spec
    count = token_counter(spec.model.source, spec.model.trust_remote_code)
    text_columns = [c for c in plan.columns if c != spec.input.id_column]
    picked = plan.shards[:: max(1, len(plan.shards) // 16)][:16]
    per_shard = max(1, sample_rows // len(picked))
    tokens = rows = 0
    for shard in picked:
        columns = [c for c in text_columns if c in shard.schema.names]  # a JSON lines file may lack a key
        if shard.format == PARQUET:  # the first rows only
            with plan.input_fs.open_input_file(shard.path) as f:
                batch = next(pq.ParquetFile(f).iter_batches(batch_size=per_shard, columns=columns), None)
        else:  # JSON lines has no row groups: the file is parsed (as planning did), its first rows kept
            batch = read_columns(plan.input_fs, shard, columns).slice(0, per_shard)
        for row in (batch.to_pylist() if batch is not None else []):
            texts = [v if isinstance(v, str) else json.dumps(v) for v in row.values() if v is not None]
            tokens += sum(map(count, texts))
            rows += 1
    total_rows = sum(s.rows for s in plan.shards)
    return (round(tokens / rows * total_rows) if rows else 0), rows
