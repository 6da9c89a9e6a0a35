"""CIFAR-10: find, download, verify, load as uint8; strided shards; input preprocessing.

Imports only labtools.paths and no TensorFlow: a process holds uint8 arrays and converts only the
batch it is about to use to float32. A training process holds only the rows it uses (load_rows:
its logical ranks' shards and the evaluation rows it evaluates, 1/N of each set for N = P), as Rows
indexed by global row number; load_cifar10 loads everything (150 MB for the training set).
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import pickle
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from . import paths

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
FOLDER = "cifar-10-batches-py"
# md5 of the official files (the values torchvision publishes).
MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
TRAIN_SIZE, TEST_SIZE = 50_000, 10_000
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# Preprocessing constants. 'caffe' is keras.applications.imagenet_utils.preprocess_input's
# default mode: RGB->BGR, subtract the ImageNet BGR means, no scaling.
IMAGENET_BGR_MEAN = np.array([103.939, 116.779, 123.68], np.float32)
CIFAR_RGB_MEAN = np.array([125.307, 122.950, 113.865], np.float32)  # training set, 0..255
CIFAR_RGB_STD = np.array([62.993, 62.089, 66.705], np.float32)


class DataError(RuntimeError):
    """Data is missing or damaged; the message says where and what to do."""

    def _render_traceback_(self):
        # IPython shows this instead of a traceback: in a notebook the same one sentence as the CLI's
        return [f"DataError: {self}"]


# ------------------------------------------------------------------ locate

def candidate_dirs(explicit: str | os.PathLike | None = None) -> list[Path]:
    """Where the batches are looked for, in order. Never the current folder: papermill and the engines
    run in notebooks/, so a relative `data/` would be another folder there (labtools.paths)."""
    c = []
    if explicit:
        c.append(Path(explicit).expanduser())
    if os.environ.get("CIFAR10_DIR"):
        c.append(Path(os.environ["CIFAR10_DIR"]).expanduser())
    c.append(paths.data_home() / FOLDER)
    c.append(Path.home() / ".keras" / "datasets" / FOLDER)
    return c


def _has_files(d: Path) -> bool:
    return d.is_dir() and all((d / f).is_file() for f in MD5)


def _not_found(why: str) -> DataError:
    """The one sentence for 'no data here and none could be fetched': every folder searched, the way out."""
    tried = ", ".join(str(d.absolute()) for d in candidate_dirs(None))
    return DataError(f"CIFAR-10 is in none of the folders searched ({tried}) and {why}; set CIFAR10_DIR or "
                     f"pass --cifar-dir to a copy of '{FOLDER}', or copy that folder into one of them.")


def find_cifar_dir(explicit: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Return the first folder holding all seven files; download into paths.data_home() if none does.

    An explicit path that lacks the files is an error (no silent fallback to another copy).
    """
    if explicit:
        d = paths.resolve(os.path.expandvars(str(explicit)))  # records keep "$CIFAR10_DIR" or project-relative
        if _has_files(d):
            return d
        if (d / FOLDER).is_dir() and _has_files(d / FOLDER):
            return d / FOLDER
        missing = [f for f in MD5 if not (d / f).is_file()]
        raise DataError(f"CIFAR-10 folder {d} lacks {', '.join(missing)}; point --cifar-dir at the "
                        f"extracted '{FOLDER}' folder or run `labtools data download`.")
    for d in candidate_dirs(None):
        if _has_files(d):
            return d
    if download:
        return download_cifar10(paths.data_home())  # its error already lists the folders and the reason
    raise _not_found("downloading is off (run `labtools data download` on a machine that is online)")


class Terminated(SystemExit):
    """SIGTERM arrived inside terminate_as_exception(); uncaught, the process exits 143 (128 + 15)."""


@contextlib.contextmanager
def terminate_as_exception():
    """Turn SIGTERM into Terminated for the block, so `finally` clauses run; restore the old handler.

    Only the main thread may set signal handlers; elsewhere this does nothing. A second SIGTERM while
    the first is being handled is ignored, so it cannot cut the cleanup short.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum, frame):
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def download_cifar10(dest: Path, deadline: float | None = None, url: str | None = None) -> Path:
    """Download the official archive, check its sha256, extract atomically into dest/FOLDER.

    url: default $LABTOOLS_CIFAR_URL or URL. deadline: seconds for the whole download, default
    $LABTOOLS_DOWNLOAD_DEADLINE or 900. Partial files are removed on every exit, SIGTERM included.
    """
    from tqdm.auto import tqdm

    url = url or os.environ.get("LABTOOLS_CIFAR_URL") or URL
    deadline = float(deadline if deadline is not None else os.environ.get("LABTOOLS_DOWNLOAD_DEADLINE") or 900)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / FOLDER
    with terminate_as_exception():  # installed before the temp folder exists, so SIGTERM always cleans up
        tmpdir = Path(tempfile.mkdtemp(prefix=".cifar-", dir=dest))
        try:
            archive = tmpdir / "cifar-10-python.tar.gz"
            start = time.monotonic()
            end, n = start + deadline, 0

            def left() -> float:
                return end - time.monotonic()

            def too_late() -> DataError:
                return _not_found(f"downloading {url} passed its {deadline:g} s deadline "
                                  f"(LABTOOLS_DOWNLOAD_DEADLINE) after {time.monotonic() - start:.1f} s "
                                  f"with {n} bytes received")
            try:
                # The socket timeout bounds one recv only, and r.read(size) loops until size bytes
                # came, so a server trickling a byte every 10 s kept it waiting forever. read1
                # returns whatever one recv got, and the deadline is checked after every chunk.
                # (The status line and headers are still bounded per recv only, at min(30, left).)
                with urllib.request.urlopen(url, timeout=max(0.01, min(30.0, left()))) as r, \
                        open(archive, "wb") as f:
                    sock = getattr(getattr(r.fp, "raw", None), "_sock", None)  # http.client internals
                    total = int(r.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, desc="CIFAR-10") as bar:
                        while True:
                            if left() <= 0:
                                raise too_late()
                            if sock is not None:
                                sock.settimeout(min(30.0, left()))
                            chunk = r.read1(1 << 20)
                            if not chunk:
                                break
                            f.write(chunk)
                            n += len(chunk)
                            bar.update(len(chunk))
            except (OSError, ValueError, http.client.HTTPException) as e:
                if left() <= 0:
                    raise too_late() from None
                raise _not_found(f"downloading {url} failed after {n} bytes ({type(e).__name__}: {e})") from None
            got = _digest(archive, "sha256")
            if got != ARCHIVE_SHA256:
                raise _not_found(f"the archive downloaded from {url} ({n} bytes) has sha256 {got}, expected "
                                 f"{ARCHIVE_SHA256}, so it is damaged or not the official file and was not extracted")
            with tarfile.open(archive) as t:
                t.extractall(tmpdir, filter="data")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmpdir / FOLDER, target)  # atomic: a half-extracted folder is never visible
            verify(target)
            return target
        except Terminated:
            print(f"CIFAR-10 download into {dest} stopped by SIGTERM; its partial files are removed.",
                  file=sys.stderr)
            raise
        finally:
            try:
                shutil.rmtree(tmpdir, ignore_errors=True)
            except Terminated:  # SIGTERM mid-cleanup: finish it (later signals are ignored), then exit
                shutil.rmtree(tmpdir, ignore_errors=True)
                raise


# ------------------------------------------------------------------ verify

def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _md5_error(path: Path, got: str, want: str) -> DataError:
    return DataError(f"{path} has md5 {got}, expected {want}: the file is truncated or altered; "
                     f"replace it with the official one (`labtools data download`).")


def verify(d: str | os.PathLike, force: bool = False) -> Path:
    """Check the md5 of all seven files, every time; `force` is accepted for old callers and ignored.

    No pass is remembered: a cache keyed by size and mtime let a same-size file with its mtime put
    back (touch -r) skip the check. Measured here: 0.44 s for the 178 MB (files in the page cache,
    md5 at ~400 MB/s on one core); loading pays it too, 1.15 s instead of 0.65 s for all six batches.
    """
    d = Path(d).resolve()
    missing = [f for f in MD5 if not (d / f).is_file()]
    if missing:
        raise DataError(f"CIFAR-10 folder {d} lacks {', '.join(missing)}; re-extract the official archive there.")
    for f, want in MD5.items():
        got = _digest(d / f, "md5")
        if got != want:
            raise _md5_error(d / f, got, want)
    return d


# ------------------------------------------------------------------ load

# The only globals the official batches reference (found by unpickling all seven with a logging
# find_class): ndarray reconstruction. numpy 2 pickles name numpy._core instead of numpy.core.
# Resolved here, not imported by name, so numpy 2's numpy.core shim warns nothing.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def _restricted_loads(data: bytes, path: Path):
    """Unpickle a CIFAR-10 batch; any global beyond ndarray reconstruction is refused, never imported."""
    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return _ALLOWED[(module, name)]
            except KeyError:
                raise DataError(f"{path} asks to load {module}.{name}, which no CIFAR-10 batch does, so it "
                                f"was not unpickled (it could run code); replace it with the official one "
                                f"(`labtools data download`).") from None

    return Unpickler(io.BytesIO(data), encoding="bytes").load()


def _load_batch(path: Path):
    path = Path(path)
    try:
        data = path.read_bytes()  # read once: the bytes checked are the bytes unpickled
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e}); replace it with the official one "
                        f"(`labtools data download`).") from None
    want = MD5.get(path.name)
    if want and (got := hashlib.md5(data).hexdigest()) != want:
        raise _md5_error(path, got, want)
    try:
        d = _restricted_loads(data, path)
        x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.asarray(d[b"labels"], np.int64)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any damage gets the same clear sentence
        raise DataError(f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {e}).") from None
    return np.ascontiguousarray(x), y


def load_cifar10(d: str | os.PathLike, train: bool = True, test: bool = True,
                 limit_train: int | None = None, limit_test: int | None = None):
    """Return (x_train, y_train, x_test, y_test): uint8 (N,32,32,3) and int64 labels (None if skipped)."""
    d = Path(d)
    xtr = ytr = xte = yte = None
    if train:
        parts = [_load_batch(d / f"data_batch_{i}") for i in range(1, 6)]
        xtr = np.concatenate([p[0] for p in parts])
        ytr = np.concatenate([p[1] for p in parts])
        if limit_train:
            xtr, ytr = xtr[:limit_train], ytr[:limit_train]
    if test:
        xte, yte = _load_batch(d / "test_batch")
        if limit_test:
            xte, yte = xte[:limit_test], yte[:limit_test]
    return xtr, ytr, xte, yte


class Rows:
    """Some rows of a longer array, indexed by their GLOBAL row numbers.

    ``len`` is the full array's length and ``rows[idx]`` (an int, a slice or an integer array of
    global indices) returns exactly what ``full[idx]`` would, as long as every row asked for is
    held; asking for a row that is not held is an IndexError, never a silent wrong row. A process
    holds only the rows its ranks train on and evaluate (load_rows), and code written for the full
    array (labtools.worker indexes by global sample number and sizes its shards from ``len``) runs
    unchanged.
    """

    def __init__(self, data: np.ndarray, held: np.ndarray, length: int):
        held = np.asarray(held, np.int64)
        if len(held) != len(data):
            raise ValueError(f"{len(held)} row numbers for {len(data)} rows")
        if len(held) and (held.min() < 0 or held.max() >= length):
            raise ValueError(f"row numbers outside 0..{length - 1}")
        self.data, self.held, self.length = data, held, int(length)
        self._pos = np.full(self.length, -1, np.int64 if self.length > 2**31 - 1 else np.int32)
        self._pos[held] = np.arange(len(held))

    def __len__(self) -> int:
        return self.length

    @property
    def shape(self) -> tuple:
        return (self.length, *self.data.shape[1:])

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def nbytes_held(self) -> int:
        return int(self.data.nbytes)

    def local(self, idx) -> np.ndarray | int:
        """Positions in ``data`` of the global rows idx (IndexError if one is not held)."""
        if isinstance(idx, slice):
            idx = np.arange(self.length)[idx]
        pos = self._pos[idx]  # numpy checks the global range (and wraps negatives like full[idx])
        if np.any(pos < 0):
            bad = np.atleast_1d(np.asarray(idx))[np.atleast_1d(pos) < 0]
            raise IndexError(f"rows {bad[:5].tolist()}{' ...' if len(bad) > 5 else ''} are not held by this "
                             f"process ({len(self.held)} of {self.length} rows are)")
        return pos

    def __getitem__(self, idx):
        if isinstance(idx, tuple):
            return self.data[(self.local(idx[0]), *idx[1:])]
        return self.data[self.local(idx)]

    def __array__(self, *a, **k):
        raise TypeError(f"Rows holds {len(self.held)} of {self.length} rows; index it by global row numbers "
                        f"instead of converting it to an array")

    def __repr__(self) -> str:
        return f"<Rows {len(self.held)} of {self.length} x {self.data.shape[1:]} {self.data.dtype}>"


def process_rows(n: int, world: int, processes: int, process: int) -> np.ndarray:
    """Global rows of the training shards of the logical ranks one process hosts: ranks
    process*k .. (process+1)*k - 1 with k = world / processes, rank r holding {i : i mod world = r}."""
    k = world // processes
    i = np.arange(n, dtype=np.int64)
    return i[(i % world) // k == process]


def eval_rows(n: int, processes: int, process: int) -> np.ndarray:
    """Rows of an evaluation set one process evaluates (labtools.worker.Worker.evaluate)."""
    return np.arange(process, n, processes, dtype=np.int64)


def _take(d: Path, names: list[str], rows: np.ndarray, size: int):
    """Rows (sorted, global over the concatenation of the named batches of `size` images each) of
    those batches, reading only the batches that hold some of them; each batch read is md5-checked
    (_load_batch) and dropped before the next is read."""
    xs, ys = [], []
    for b, name in enumerate(names):
        lo, hi = np.searchsorted(rows, [b * size, (b + 1) * size])
        if lo == hi:
            continue
        x, y = _load_batch(d / name)
        sel = rows[lo:hi] - b * size
        xs.append(x[sel])  # fancy indexing copies: the batch's arrays are freed with x, y
        ys.append(y[sel])
        del x, y
    if not xs:
        return np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def load_rows(d: str | os.PathLike, world: int, processes: int, process: int, *,
              limit_train: int | None = None, limit_test: int | None = None, val_split: int = 0,
              probe: int = 0):
    """What one process of a run needs, as Rows indexed like load_cifar10's arrays (after
    split_validation when val_split): (x_train, y_train, x_eval, y_eval).

    Training: the rows of the shards of the process's logical ranks (process_rows), plus the first
    `probe` rows (the root's dead-ReLU probe batch). Evaluation: the rows the process evaluates
    (eval_rows) of the test set, or of the held-out last val_split training images. For N = P that is
    1/N of each set. Same values as the full load, row for row.
    """
    d = Path(d)
    n_all = min(limit_train or TRAIN_SIZE, TRAIN_SIZE)
    n_train = n_all - val_split
    train = np.union1d(process_rows(n_train, world, processes, process), np.arange(min(probe, n_train)))
    if val_split:
        ev = n_train + eval_rows(val_split, processes, process)
        x, y = _take(d, [f"data_batch_{i}" for i in range(1, 6)], np.concatenate([train, ev]), TRAIN_SIZE // 5)
        t = len(train)
        return (Rows(x[:t], train, n_train), Rows(y[:t], train, n_train),
                Rows(x[t:], ev - n_train, val_split), Rows(y[t:], ev - n_train, val_split))
    x, y = _take(d, [f"data_batch_{i}" for i in range(1, 6)], train, TRAIN_SIZE // 5)
    n_test = min(limit_test or TEST_SIZE, TEST_SIZE)
    ev = eval_rows(n_test, processes, process)
    xe, ye = _take(d, ["test_batch"], ev, TEST_SIZE)
    return Rows(x, train, n_train), Rows(y, train, n_train), Rows(xe, ev, n_test), Rows(ye, ev, n_test)


def split_validation(x: np.ndarray, y: np.ndarray, k: int):
    """(x_train, y_train, x_val, y_val): the last k training images held out for model selection."""
    if not 0 < k < len(y):
        raise ValueError(f"validation split {k} must be between 1 and {len(y) - 1}")
    return x[:-k], y[:-k], x[-k:], y[-k:]


# ------------------------------------------------------------------ shards

def shard_indices(n: int, world: int, rank: int) -> np.ndarray:
    """The paper's strided shard I_r = {i : i mod N = r} (§3.2.2)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of size {world}")
    return np.arange(rank, n, world, dtype=np.int64)


def epoch_order(shard: np.ndarray, epoch: int, seed: int, rank: int, shuffle: bool) -> np.ndarray:
    """The order a rank visits its shard in an epoch: fixed (the paper) or a seeded permutation."""
    if not shuffle:
        return shard
    rng = np.random.default_rng([seed, rank, epoch])
    return shard[rng.permutation(len(shard))]


def dropout_keys(indices: np.ndarray, epoch: int, seed: int) -> np.ndarray:
    """Per-sample dropout keys: a function of (seed, epoch, sample index) only, never of the rank."""
    k = (indices.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
         + np.uint64((seed * 1_000_003 + epoch) * 0x632BE59BD9B4E019 % (1 << 64)))
    return ((k >> np.uint64(33)) & np.uint64(0x7FFFFFFF)).astype(np.int64)


# ------------------------------------------------------------------ preprocessing

def preprocess(x: np.ndarray, mode: str) -> np.ndarray:
    """uint8 (B,32,32,3) RGB -> float32 model input."""
    x = x.astype(np.float32)
    if mode == "caffe":
        return x[..., ::-1] - IMAGENET_BGR_MEAN
    if mode == "unit":
        return x / 255.0
    if mode == "standardize":
        return (x - CIFAR_RGB_MEAN) / CIFAR_RGB_STD
    raise ValueError(f"unknown preprocessing mode {mode!r}")
