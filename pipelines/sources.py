"""Find out what an input is (Parquet, a folder of images, JSONL), check it has usable columns, and read it
as a Ray Dataset. Whole-input problems fail here, with one message, before any work starts."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.config import Columns

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp")
JSONL_EXTENSIONS = ("jsonl", "json")
FOLDER_ID_COLUMN = "path"  # read_binary_files(include_paths=True) names the file's path "path"


@dataclass(frozen=True)
class InputSpec:
    """A resolved input. kind: parquet | images | jsonl; id_column: the column that identifies a row (the
    resume key; it is present right after the read); image_column / image_path_column: where the image is
    (one of them may be None); prompt_column: None when rows carry no prompt; base_dir: what relative
    image paths are relative to."""

    path: str
    kind: str
    id_column: str
    image_column: str | None
    image_path_column: str | None
    prompt_column: str | None
    base_dir: str


def _file_info(path: str) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    try:
        fs, inner = pafs.FileSystem.from_uri(path)
    except ValueError:  # a plain (relative) local path: pyarrow.ArrowInvalid is a ValueError
        fs, inner = pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    return fs, inner, fs.get_file_info(inner)


def _list_files(fs: pafs.FileSystem, inner: str) -> list[str]:
    return [f.path for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
            if f.type == pafs.FileType.File and not Path(f.path).name.startswith((".", "_"))]


def _extension(path: str) -> str:
    return Path(path).suffix.lower().lstrip(".")


def detect_kind(path: str) -> tuple[str, str]:
    """(kind, the path to read: absolute for local paths, the URI otherwise); ValueError when there is no such
    input or nothing usable in it."""
    fs, inner, info = _file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"input {path}: no such file or folder")
    files = [inner] if info.type == pafs.FileType.File else _list_files(fs, inner)
    kinds = {"parquet" if _extension(f) == "parquet" else "jsonl" if _extension(f) in JSONL_EXTENSIONS
             else "images" if _extension(f) in IMAGE_EXTENSIONS else None for f in files}
    kinds.discard(None)
    if not kinds:
        raise ValueError(f"input {path}: no Parquet, JSONL or image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    if len(kinds) > 1:
        raise ValueError(f"input {path}: mixes {' and '.join(sorted(kinds))} files; give one kind per job")
    return kinds.pop(), (path if "://" in path else inner)


def _schema_names(ds) -> list[str]:
    schema = ds.schema()
    return list(schema.names) if schema is not None else []


def with_v1_parquet_reader(job):
    """Run `job` with Ray Data reading Parquet through its V1 datasource. The V2 datasource (Ray 2.60's default)
    starts 32 footer-reader actors for every `read_parquet`, one file or thousands: 11 s of a 16 s, 20-row job on
    2 cores, paid again by the checkpoint read of every resume. V1 reads the footers in the driver, in parallel
    tasks beyond a couple of dozen files. Only this job's reads change (a copy of the current DataContext)."""

    @functools.wraps(job)
    def run(*args, **kwargs):
        from ray.data import DataContext

        context = copy.deepcopy(DataContext.get_current())
        context.use_datasource_v2 = False
        with DataContext.current(context):
            return job(*args, **kwargs)

    return run


def open_input(path: str, columns: Columns):
    """Read `path` lazily as a Ray Dataset and say how its rows map to the job's fields.
    Returns (dataset, InputSpec). ValueError for a missing path or an input without usable columns."""
    import ray.data

    kind, path = detect_kind(path)
    if kind == "images":
        ds = ray.data.read_binary_files(path, include_paths=True, file_extensions=list(IMAGE_EXTENSIONS))
    elif kind == "parquet":
        ds = ray.data.read_parquet(path)
    else:
        ds = ray.data.read_json(path, lines=True, file_extensions=list(JSONL_EXTENSIONS))
    return ds, resolve_spec(path, kind, _schema_names(ds), columns)


def read_table(path: str, columns: Columns, limit: int | None = None, fields: list[str] | None = None,
               number_rows: bool = True) -> tuple[pa.Table, InputSpec]:
    """The same input read in this process with pyarrow, for small inputs (`dynllava eval --data`): the first
    `limit` rows of a Parquet or JSONL file or folder, and its InputSpec. A folder of images has no per-row
    fields beyond the image, so it is refused here. Without an id column and with `number_rows`, the row's
    position becomes its id (answered in this process, there is no resume to key, and one image may carry
    several questions); without `number_rows` the spec names the id the caption job writes (the image path),
    to join a job's output. `fields`: read only these columns (those present; the spec is still resolved
    against the whole schema), e.g. to join references by id without reading the images."""
    import pyarrow.dataset as pads
    import pyarrow.json as pajson

    kind, path = detect_kind(path)
    if kind == "images":
        raise ValueError(f"input {path}: a folder of images has no prompts or references; give a Parquet or JSONL "
                         f"file with an image, a prompt and a reference per row")
    fs, inner, info = _file_info(path)
    files = [inner] if info.type == pafs.FileType.File else sorted(_list_files(fs, inner))
    if kind == "parquet":
        dataset = pads.dataset([f for f in files if _extension(f) == "parquet"], format="parquet", filesystem=fs)
        names = dataset.schema.names
        project = [f for f in fields if f in names] if fields else None
        table = dataset.head(limit, columns=project) if limit else dataset.to_table(columns=project)
    else:
        tables, n = [], 0
        for f in files:
            if _extension(f) not in JSONL_EXTENSIONS or (limit and n >= limit):
                continue
            with fs.open_input_stream(f) as stream:
                tables.append(pajson.read_json(stream))
            n += tables[-1].num_rows
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
        table = table.slice(0, limit) if limit else table
        names = table.column_names
        if fields:
            table = table.select([f for f in fields if f in names])
    if number_rows and columns.id not in names:  # not the image path: one image may carry several questions
        table = table.append_column(columns.id, pa.array([str(i) for i in range(table.num_rows)]))
        names = names + [columns.id]
    return table, resolve_spec(path, kind, names, columns)


def count_rows(path: str, stop_after: int | None = None) -> int:
    """Rows of a Parquet or JSONL input without reading its data: Parquet footers, or JSONL lines counted in
    1 MiB reads. With `stop_after`, counting may stop once the count exceeds it (the answer is then > it)."""
    import pyarrow.parquet as pq

    kind, path = detect_kind(path)
    fs, inner, info = _file_info(path)
    files = [inner] if info.type == pafs.FileType.File else sorted(_list_files(fs, inner))
    n = 0
    for f in files:
        if kind == "parquet" and _extension(f) == "parquet":
            n += pq.ParquetFile(f, filesystem=fs).metadata.num_rows
        elif kind == "jsonl" and _extension(f) in JSONL_EXTENSIONS:
            with fs.open_input_stream(f) as stream:
                last = b"\n"
                while chunk := stream.read(1 << 20):
                    n += chunk.count(b"\n")
                    last = chunk[-1:]
                    if stop_after is not None and n > stop_after:
                        return n
                n += last != b"\n"  # a last line without its newline
        if stop_after is not None and n > stop_after:
            return n
    return n


def resolve_spec(path: str, kind: str, names: list[str], columns: Columns) -> InputSpec:
    """How an input's columns map to a row's fields (one definition for the job and the evaluation). ValueError
    when there is no image column or no stable id."""
    is_dir = _file_info(path)[2].type == pafs.FileType.Directory
    base_dir = path if is_dir else path.rsplit("/", 1)[0]  # what relative image paths are relative to
    if kind == "images":
        return InputSpec(path, kind, FOLDER_ID_COLUMN, "bytes", None, None, base_dir)
    image = columns.image if columns.image in names else None
    image_path = columns.image_path if columns.image_path in names else None
    if image is None and image_path is None:
        raise ValueError(f"input {path}: no image column: expected {columns.image!r} (bytes"
                         f"{' or base64' if kind == 'jsonl' else ''}) or {columns.image_path!r}; "
                         f"columns are {names} (set columns.image / columns.image_path in the config)")
    if columns.id in names:
        id_column = columns.id
    elif image_path is not None:
        id_column = image_path  # a path names its row stably across reruns
    else:
        raise ValueError(f"input {path}: no {columns.id!r} column and no {columns.image_path!r} column to use as "
                         f"the row id; resuming and exactly-once output need a stable id per row "
                         f"(columns are {names}; set columns.id in the config)")
    prompt = columns.prompt if columns.prompt in names else None
    return InputSpec(path, kind, id_column, image, image_path, prompt, base_dir)
