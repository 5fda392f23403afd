"""Where a caption job writes: any pyarrow filesystem (local, file://, s3://, gs://, abfs://), and the few file
operations the job needs there (list its Parquet files, read and replace small JSON records), with URIs
redacted wherever they are logged or recorded."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

PENDING_SUFFIX = ".pending.parquet"  # Ray Data's uncommitted checkpoint files
_CREDENTIALS = re.compile(r"^([a-zA-Z][\w+.-]*://)[^/@]*@")  # scheme://user:secret@host...
_SECRET_PARAMS = re.compile(r"((?:access_key|secret_key|session_token|token|password|sas_token|key)=)[^&]*",
                            re.IGNORECASE)


def redact(uri: str) -> str:
    """`uri` without credentials: s3://KEY:SECRET@bucket/x -> s3://***@bucket/x, ?secret_key=... -> ?secret_key=***."""
    return _SECRET_PARAMS.sub(r"\1***", _CREDENTIALS.sub(r"\1***@", str(uri)))


def resolve(path_or_uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path or any URI pyarrow understands; credentials and endpoints come
    from the URI or the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...), as pyarrow reads them."""
    text = str(path_or_uri)
    if "://" not in text:
        return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(text)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with the cause
        raise ValueError(f"output {redact(text)}: {e}") from None


@dataclass(frozen=True)
class OutputLocation:
    """A job's output folder on its filesystem."""

    uri: str  # as the user gave it, redacted (for logs and records)
    fs: pafs.FileSystem  # the filesystem (carries the credentials; never recorded)
    path: str  # the folder on `fs`

    def join(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def parquet_files(self) -> dict[str, int]:
        """{file name: size} of the output's Parquet files (one listing, no reads)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return {Path(i.path).name: i.size for i in infos
                if i.type == pafs.FileType.File and i.path.endswith(".parquet")}

    def read_text(self, name: str) -> str | None:
        """A small file's text, or None when it does not exist."""
        if self.fs.get_file_info(self.join(name)).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(self.join(name)) as f:
            return f.read().decode()

    def write_text(self, name: str, text: str) -> None:
        """Replace a small file whole (see `replace`)."""
        def write(path: str) -> None:
            with self.fs.open_output_stream(path) as f:
                f.write(text.encode())
        self.replace(self.join(name), write)

    def write_table(self, path: str, table) -> None:
        """Replace a Parquet file on the output with `table` (see `replace`); an empty table deletes it."""
        import pyarrow.parquet as pq

        if table.num_rows == 0:
            self.fs.delete_file(path)
        else:
            self.replace(path, lambda tmp: pq.write_table(table, tmp, filesystem=self.fs))

    def replace(self, path: str, write) -> None:
        """Replace `path` whole with what `write(path)` writes: a temporary file renamed over it where the
        filesystem renames (local), one PUT elsewhere (object stores replace an object atomically)."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            write(path + ".tmp")
            self.fs.move(path + ".tmp", path)
        else:
            write(path)

    def committed_checkpoint_files(self, checkpoint_dir: str) -> list[str]:
        """Paths of the committed files of Ray Data's checkpoint under `checkpoint_dir` (its pending ones, which
        its own restore cleans, left out)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.join(checkpoint_dir), allow_not_found=True))
        return [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                and not i.path.endswith(PENDING_SUFFIX)]


def open_output(path_or_uri: str | Path) -> OutputLocation:
    """The output folder, created when missing; ValueError with the cause when it cannot be (bad bucket,
    credentials, endpoint, or a file in the way), before any work starts."""
    fs, path = resolve(path_or_uri)
    where = redact(str(path_or_uri))
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            raise ValueError(f"output {where}: is a file, not a folder")
        if info.type == pafs.FileType.NotFound:
            fs.create_dir(path, recursive=True)
        probe = f"{path.rstrip('/')}/_write_probe"
        with fs.open_output_stream(probe) as f:  # fail now on read-only buckets or missing permissions
            f.write(b"ok")
        fs.delete_file(probe)
    except ValueError:
        raise
    except Exception as e:  # OSError / ArrowException from the filesystem, with its message
        raise ValueError(f"output {where}: cannot write there ({type(e).__name__}: {e})") from None
    return OutputLocation(where, fs, path)


def existing_output(path_or_uri: str | Path) -> OutputLocation:
    """An output folder to read (nothing is created or written); ValueError when it is not there."""
    fs, path = resolve(path_or_uri)
    where = redact(str(path_or_uri))
    try:
        info = fs.get_file_info(path)
    except Exception as e:  # OSError / ArrowException from the filesystem
        raise ValueError(f"output {where}: cannot read it ({type(e).__name__}: {e})") from None
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"output {where}: no such folder")
    return OutputLocation(where, fs, path)
