"""Splits that are not directly readable: on an object store (s3://, gs://, hf://, ...) or
local but zstd-compressed. They are fetched into a local cache before step 1.

`fetch_split(source, split, cache)` brings `<source>/meta.json` (if any) and every shard of
`<source>/<split>` into `<cache>/<split>`:

- a quick probe first (`probe_remote`: one request with short connect/read timeouts and no
  retries), so a wrong endpoint, bucket, prefix or missing credentials is one clear error within
  seconds, naming the URL and the variable to set, never a retry storm;
- shards are fetched by a thread pool (`workers`, default `DEFAULT_WORKERS`) with one tqdm bar
  over bytes (and a count of shards), each into a hidden temp name (`.<shard>.part`), checked
  (its MDS header against index.json's sample count, and its content hash against index.json's,
  with `check_shard_header` / `shard_hash_problem` of `ettin.data.shards`, the checks of local
  shards) and only then renamed into place, so a kill at any moment never leaves a half-fetched
  shard under its real name: a rerun fetches only what is missing;
- compressed shards (index.json `zip_data`, e.g. the published Ettin phases' `.mds.zstd`) are
  fetched compressed, checked against the zip hash, decompressed, and the raw shard checked
  against the raw hash, so the cache holds directly readable shards;
- `<cache>/<split>/index.json` is written last: a cache with index.json is complete;
- shards in per-source subfolders (index.json basenames such as `dclm/shard.00000.mds.zstd`,
  the published phases' layout) keep their subfolders in the cache.

In a distributed run only local rank 0 of each node fetches; the node's other ranks wait for it
(`composer.utils.dist.run_local_rank_zero_first`). The same code decompresses a local split in
place (`decompress_split`, `ettin data decompress SPLIT`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from ettin.data.shards import (
    INDEX,
    META,
    DataError,
    check_shard_header,
    decompress,
    is_remote,
    join,
    local_path,
    read_index,
    shard_hash_problem,
)

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 8
"""Shards fetched at once (threads; object stores serve parallel requests well)."""
PROBE_TIMEOUT_S = 5.0
"""Connect/read timeout of the first request to a remote (no retries)."""
DOWNLOAD_TIMEOUT_S = 600.0
PART = ".part"

CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE); S3_ENDPOINT_URL for an "
    "S3-compatible store other than AWS (MinIO, R2, ...)",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS (a service-account key file), or GCS_KEY and "
    "GCS_SECRET (HMAC keys)",
    "hf": "HF_TOKEN for a private or gated dataset",
    "oci": "OCI_CONFIG_FILE",
    "azure": "AZURE_ACCOUNT_NAME and AZURE_ACCOUNT_ACCESS_KEY",
}
"""What each scheme reads its credentials from (named in errors)."""


class RemoteError(DataError):
    """A remote split that cannot be reached or read: names the URL and what to set."""


def _scheme(url: str) -> str:
    return urllib.parse.urlparse(url).scheme


def _hint(url: str) -> str:
    creds = CREDENTIALS.get(_scheme(url))
    return f" (credentials: {creds})" if creds else ""


# --------------------------------------------------------------------------- probe


def _s3_client(*, unsigned: bool = False, probe: bool = False):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    kw = {"signature_version": UNSIGNED} if unsigned else {}
    if probe:
        kw.update(
            connect_timeout=PROBE_TIMEOUT_S,
            read_timeout=PROBE_TIMEOUT_S,
            retries={"total_max_attempts": 1, "mode": "standard"},
        )
    return boto3.session.Session().client(
        "s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None, config=Config(**kw)
    )


def _probe_s3(url: str) -> None:
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    obj = urllib.parse.urlparse(url)
    bucket, key = obj.netloc, obj.path.lstrip("/")
    endpoint = os.environ.get("S3_ENDPOINT_URL")
    where = (
        f"endpoint {endpoint} (S3_ENDPOINT_URL)"
        if endpoint
        else "AWS S3 (S3_ENDPOINT_URL is not set)"
    )
    unsigned = False
    for _ in range(2):
        client = _s3_client(unsigned=unsigned, probe=True)
        try:
            client.head_object(Bucket=bucket, Key=key)
            return
        except NoCredentialsError:
            unsigned = True  # a public bucket needs none: try once without signing
            continue
        except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as err:
            raise RemoteError(
                f"cannot reach {where} to read {url}: {err}. Check S3_ENDPOINT_URL (and that the "
                f"server is up), or unset it to use AWS S3"
            ) from None
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or (
                status == 403
            ):
                missing = (
                    "no credentials were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                    "(or AWS_PROFILE)"
                    if unsigned
                    else "the credentials were refused: check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's permissions"
                )
                raise RemoteError(
                    f"access to {url} on {where} denied ({code}): {missing}"
                ) from None
            if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound") or status == 404:
                try:
                    client.head_bucket(Bucket=bucket)
                    what = (
                        f"{url} does not exist: the bucket is there but not this object; check "
                        f"data.path (it names a prepared phase, holding <split>/{INDEX})"
                    )
                except ClientError:
                    what = (
                        f"bucket {bucket!r} does not exist on {where}: check the bucket in "
                        f"data.path and S3_ENDPOINT_URL"
                    )
                raise RemoteError(what) from None
            raise RemoteError(f"cannot read {url} on {where}: {err}{_hint(url)}") from None
    raise RemoteError(f"cannot read {url} on {where}{_hint(url)}")  # pragma: no cover


def _s3_failure(url: str, err: Exception) -> RemoteError:
    endpoint = os.environ.get("S3_ENDPOINT_URL") or "AWS S3 (S3_ENDPOINT_URL is not set)"
    return RemoteError(f"cannot read {url} on {endpoint}: {err}{_hint(url)}")


def list_s3(url: str, suffix: str = "") -> tuple[bool, dict[str, int]]:
    """(is a folder, {path relative to `url`: bytes}) of the objects ending in `suffix` under
    the S3 prefix `url` (a folder), or of the single object `url`."""
    from botocore.exceptions import BotoCoreError, ClientError

    obj = urllib.parse.urlparse(url)
    bucket, key = obj.netloc, obj.path.strip("/")
    client = _s3_client()
    found: dict[str, int] = {}
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{key}/" if key else ""
        )
        for page in pages:
            for item in page.get("Contents", []):
                rel = item["Key"][len(key) + 1 if key else 0 :]
                if rel.endswith(suffix):
                    found[rel] = int(item["Size"])
        if found or not key:
            return True, found
        head = client.head_object(Bucket=bucket, Key=key)
        return False, {key.rsplit("/", 1)[-1]: int(head["ContentLength"])}
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return True, {}
        raise _s3_failure(url, err) from None
    except BotoCoreError as err:
        raise _s3_failure(url, err) from None


def download_s3(url: str, dest: Path) -> None:
    """Download the S3 object `url` into `dest`."""
    from botocore.exceptions import BotoCoreError, ClientError

    obj = urllib.parse.urlparse(url)
    try:
        _s3_client().download_file(obj.netloc, obj.path.lstrip("/"), str(dest))
    except (BotoCoreError, ClientError) as err:
        raise _s3_failure(url, err) from None


def parse_hf(url: str) -> tuple[str, str]:
    """(repo id, path in the repo) of `hf://datasets/<org>/<name>/<path>`."""
    parts = url.split("/", 5)
    if len(parts) < 5 or parts[2] != "datasets" or not parts[3] or not parts[4]:
        raise RemoteError(
            f"{url} is not a Hugging Face dataset URL: write hf://datasets/<org>/<name>[/<folder>]"
        )
    return f"{parts[3]}/{parts[4]}", parts[5] if len(parts) > 5 else ""


def _probe_hf(url: str) -> None:
    repo, path = parse_hf(url)
    fix = (
        "or fetch the phase where the Hub is reachable and point data.path at that folder; "
        "HF_TOKEN for a private or gated dataset"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise RemoteError(
            f"cannot read {url}: HF_HUB_OFFLINE is set, so the Hugging Face Hub is not contacted. "
            f"Unset HF_HUB_OFFLINE, {fix}"
        )
    try:
        import huggingface_hub

        huggingface_hub.get_hf_file_metadata(
            huggingface_hub.hf_hub_url(repo, path, repo_type="dataset"), timeout=PROBE_TIMEOUT_S
        )
    except Exception as err:  # offline, DNS, timeouts, 401/404: all one message
        raise RemoteError(
            f"cannot read {url} from the Hugging Face Hub (dataset {repo}, file {path}): "
            f"{type(err).__name__}: {err}. Check the URL and the network, {fix}"
        ) from None


def probe_remote(url: str) -> None:
    """Fail fast, with one clear message, if the file `url` cannot be read."""
    scheme = _scheme(url)
    if scheme == "s3":
        _probe_s3(url)
    elif scheme == "hf":
        _probe_hf(url)
    # other schemes: the first download (index.json) is the probe


# --------------------------------------------------------------------------- one file


class _Getter:
    """Copies `source`-relative files to local paths: Streaming's downloader per thread for
    remotes (it honours S3_ENDPOINT_URL, GCS/OCI/Azure/HF credentials), a copy for local paths."""

    def __init__(self, source: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
        self.source, self.timeout = source, timeout
        self.remote = is_remote(source)
        self._local = threading.local()

    def __call__(self, rel: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest.unlink()
        if not self.remote:
            shutil.copyfile(Path(self.source) / rel, dest)
            return
        from streaming.base.storage import CloudDownloader

        url = join(self.source, rel)
        if getattr(self._local, "downloader", None) is None:
            self._local.downloader = CloudDownloader.get(url)
        try:
            self._local.downloader.download(url, str(dest), self.timeout)
        except Exception as err:
            raise RemoteError(f"could not download {url}: {err}{_hint(url)}") from err


# --------------------------------------------------------------------------- shards


def _part(path: Path) -> Path:
    return path.with_name(f".{path.name}{PART}")


def _check(path: Path, info: dict, samples: int | None, index_file: Path, what: str) -> None:
    """The checks of a local shard (header for raw shards, content hash when recorded)."""
    if samples is not None:
        try:
            check_shard_header(path, samples, index_file)
        except DataError as err:
            raise DataError(f"{what}: {err}") from None
    size = path.stat().st_size
    if "bytes" in info and size != int(info["bytes"]):
        raise DataError(
            f"{what}: {path.name} has {size} bytes, {index_file} says {info['bytes']}; it is "
            f"truncated or was replaced: re-upload it or re-run `ettin prep`"
        )
    try:
        why = shard_hash_problem(path, info)
    except LookupError:
        return  # index.json records no hash: the header and size checks are all there is
    if why:
        raise DataError(
            f"{what} is corrupted ({why}): it is not what `ettin prep` wrote, so it was not kept. "
            f"Upload it again (or re-run `ettin prep --out` for this phase)"
        )


def _decompress(zipped: Path, algo: str, out: Path) -> None:
    out.write_bytes(decompress(algo, zipped.read_bytes()))


def _have(split_dir: Path, shard: dict) -> bool:
    """The raw shard is in place with the size index.json records (it was only renamed there
    after its checks)."""
    raw = shard["raw_data"]
    path = split_dir / raw["basename"]
    return path.is_file() and path.stat().st_size == int(raw["bytes"])


def _fetch_shard(get: _Getter | None, split: str, src_dir: Path, dest_dir: Path, shard: dict,
                 index_file: Path, where: str) -> int:  # fmt: skip
    """Bring one shard into `dest_dir` as a checked, directly readable raw shard; return the
    bytes transferred or read. `get` None: read the shard from the local folder `src_dir`."""
    raw, zipped = shard["raw_data"], shard.get("zip_data")
    final = dest_dir / raw["basename"]
    final.parent.mkdir(parents=True, exist_ok=True)  # shards may sit in per-source subfolders
    rpart = _part(final)
    samples = int(shard["samples"])
    raw_here = get is None and (src_dir / raw["basename"]).is_file()
    if zipped and not raw_here:
        if get is not None:
            zfile = _part(dest_dir / zipped["basename"])
            get(f"{split}/{zipped['basename']}", zfile)
        else:
            zfile = src_dir / zipped["basename"]
            if not zfile.is_file():
                raise DataError(
                    f"{where}: neither {raw['basename']} nor its compressed {zipped['basename']} "
                    f"is in {src_dir}; re-run `ettin prep` or copy the missing file"
                )
        _check(zfile, zipped, None, index_file, where)
        algo = shard.get("compression") or "zstd"
        try:
            _decompress(zfile, algo, rpart)
        except Exception as err:
            raise DataError(
                f"{where}: {zfile.name} does not decompress with {algo!r} ({err}); it is "
                f"damaged: re-download it or re-run `ettin prep`"
            ) from err
        _check(rpart, raw, samples, index_file, where)
        rpart.rename(final)
        if get is not None:
            zfile.unlink()
        return int(zipped.get("bytes", 0))
    if get is not None:
        get(f"{split}/{raw['basename']}", rpart)
    else:
        shutil.copyfile(src_dir / raw["basename"], rpart)
    _check(rpart, raw, samples, index_file, where)
    rpart.rename(final)
    return int(raw["bytes"])


def _transfer_bytes(shard: dict, compressed_source: bool = True) -> int:
    z = shard.get("zip_data")
    return int((z if z and compressed_source else shard["raw_data"]).get("bytes", 0))


def _run_pool(jobs: list[Callable[[], int]], workers: int, desc: str, total: int,
              quiet: bool) -> None:  # fmt: skip
    from tqdm.auto import tqdm

    if not jobs:
        return
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=quiet) as bar:
        done = 0
        with ThreadPoolExecutor(max(1, min(workers, len(jobs)))) as pool:
            futures = [pool.submit(job) for job in jobs]
            try:
                for fut in as_completed(futures):
                    bar.update(fut.result())
                    done += 1
                    bar.set_postfix_str(f"{done}/{len(jobs)} shards", refresh=False)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


def _clean_parts(split_dir: Path) -> None:
    for p in split_dir.rglob(f".*{PART}"):
        p.unlink(missing_ok=True)  # left by a killed fetch


def fetch_split(source: str, split: str, cache: str | os.PathLike, *,
                workers: int = DEFAULT_WORKERS, quiet: bool | None = None) -> Path:  # fmt: skip
    """Bring `<source>/meta.json` and `<source>/<split>` into `cache` (see the module doc);
    returns `cache`. `source` is a URL or a local phase folder (a path or `file://` URL: then
    compressed shards are decompressed into the cache and raw ones copied)."""
    from composer.utils import dist

    root = Path(cache)
    with dist.run_local_rank_zero_first():
        if dist.get_local_rank() == 0:
            _fetch(local_path(source), split, root, workers=workers, quiet=quiet)
    return root


def _complete(split_dir: Path) -> bool:
    if not (split_dir / INDEX).is_file():
        return False
    try:
        index = read_index(split_dir)
    except DataError:
        return False
    return all(_have(split_dir, s) for s in index["shards"])


def _fetch(source: str, split: str, root: Path, *, workers: int, quiet: bool | None) -> None:
    t0 = time.perf_counter()
    remote = is_remote(source)
    split_dir = root / split
    if _complete(split_dir):
        return  # index.json is written last: everything is in
    index_url = join(source, split, INDEX)
    if remote:
        probe_remote(index_url)
    else:
        read_index(Path(source) / split)  # the source's own problems, named with its paths
    get = _Getter(source)
    split_dir.mkdir(parents=True, exist_ok=True)
    _clean_parts(split_dir)
    (split_dir / INDEX).unlink(missing_ok=True)
    stage = root / f".{split}.fetching"
    stage.mkdir(exist_ok=True)
    get(f"{split}/{INDEX}", stage / INDEX)
    try:
        index = read_index(stage)
    except DataError as err:
        raise DataError(f"{index_url}: {err}") from None
    if not (root / META).exists():
        part = root / f".{META}{PART}"
        try:
            get(META, part)
            part.rename(root / META)
        except (RemoteError, OSError) as err:  # a phase without meta.json is still usable
            log.warning("%s has no %s (%s); the loader checks sampled rows instead", source, META,
                        str(err).splitlines()[0])  # fmt: skip
    todo = [s for s in index["shards"] if not _have(split_dir, s)]
    src_dir = Path(source) / split if not remote else split_dir
    jobs = [
        (lambda s=s: _fetch_shard(get if remote else None, split, src_dir, split_dir, s,
                                  stage / INDEX, join(source, split, s["raw_data"]["basename"])))
        for s in todo
    ]  # fmt: skip
    total = sum(_transfer_bytes(s) for s in todo)
    verb = "download" if remote else "decompress"
    _run_pool(jobs, workers, f"{verb} {split}", total, quiet=bool(quiet))
    (stage / INDEX).replace(split_dir / INDEX)
    shutil.rmtree(stage, ignore_errors=True)
    if todo:
        log.info("%s: %d shards (%.1f MB) of %s/%s into %s in %.1f s", verb, len(todo),
                 total / 1e6, source, split, split_dir, time.perf_counter() - t0)  # fmt: skip


def needs_decompression(split_dir: Path) -> bool:
    """A local split whose index.json lists compressed shards that are not decompressed."""
    try:
        index = json.loads((split_dir / INDEX).read_text())
        return any(
            s.get("zip_data") and not (split_dir / s["raw_data"]["basename"]).exists()
            for s in index.get("shards", [])
        )
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def decompress_split(split_dir: Path, *, workers: int = DEFAULT_WORKERS, quiet: bool = False,
                     keep_zip: bool = True) -> tuple[int, int]:  # fmt: skip
    """Decompress every compressed shard of a local split in place (checked against index.json's
    hashes when recorded; idempotent). Returns (shards decompressed, shards already raw)."""
    index = read_index(split_dir)
    _clean_parts(split_dir)
    todo = [s for s in index["shards"] if s.get("zip_data") and not _have(split_dir, s)]
    jobs = [
        (lambda s=s: _fetch_shard(None, "", split_dir, split_dir, s, split_dir / INDEX,
                                  str(split_dir / s["zip_data"]["basename"])))
        for s in todo
    ]  # fmt: skip
    _run_pool(jobs, workers, f"decompress {split_dir.name}", sum(map(_transfer_bytes, todo)), quiet)
    if not keep_zip:
        for s in index["shards"]:
            if s.get("zip_data") and _have(split_dir, s):
                (split_dir / s["zip_data"]["basename"]).unlink(missing_ok=True)
    return len(todo), len(index["shards"]) - len(todo)


# --------------------------------------------------------------------------- upload


def upload_tree(local: Path, remote: str, *, workers: int = DEFAULT_WORKERS, quiet: bool = False,
                last: tuple[str, ...] = (INDEX, "stats.json", META)) -> int:  # fmt: skip
    """Upload every file under `local` to `remote` (Streaming's uploader: any scheme it knows),
    shards first, then each split's index.json, then stats.json and meta.json, so a reader
    never sees an index.json whose shards are not there yet. Returns the files uploaded."""
    from streaming.base.storage.upload import CloudUploader

    logging.getLogger("streaming.base.storage.upload").setLevel(logging.ERROR)  # "dir exists"
    probe_dir = remote.rstrip("/")
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    rank = {name: i + 1 for i, name in enumerate(last)}
    groups: dict[int, list[str]] = {}
    for f in files:
        groups.setdefault(rank.get(Path(f).name, 0), []).append(f)
    tls = threading.local()

    def up(rel: str) -> int:
        if getattr(tls, "uploader", None) is None:
            try:
                tls.uploader = CloudUploader.get(out=(str(local), probe_dir), keep_local=True,
                                                 exist_ok=True)  # fmt: skip
            except Exception as err:
                raise RemoteError(f"cannot write to {remote}: {err}{_hint(remote)}") from err
        tls.uploader.upload_file(rel)
        return (local / rel).stat().st_size

    if _scheme(remote) == "s3":
        bucket = urllib.parse.urlparse(remote).netloc
        _probe_s3_bucket(bucket, remote)
    for g in sorted(groups):
        total = sum((local / f).stat().st_size for f in groups[g])
        _run_pool([lambda f=f: up(f) for f in groups[g]], workers, f"upload {remote}", total, quiet)
    return len(files)


def _probe_s3_bucket(bucket: str, remote: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        _s3_client(probe=True).head_bucket(Bucket=bucket)
    except ClientError as err:
        raise RemoteError(
            f"cannot write to {remote}: bucket {bucket!r} is not there or not yours ({err}); "
            f"create it, or check S3_ENDPOINT_URL and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        ) from None
    except BotoCoreError as err:
        endpoint = os.environ.get("S3_ENDPOINT_URL") or "AWS S3 (S3_ENDPOINT_URL is not set)"
        raise RemoteError(
            f"cannot write to {remote} on {endpoint}: {err}. Check S3_ENDPOINT_URL and "
            f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        ) from None
