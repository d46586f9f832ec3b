"""Download item images (needs internet; separate from encoding so it can run elsewhere and resume).

    python dataset_conversion/download_images.py --dataset_dir dataset/Office          # URLs from Office.item
    python dataset_conversion/download_images.py --url_list urls.tsv --image_dir imgs  # "<token>\t<url>" lines

Writes ``<image_dir>/<item token><ext>`` (default image_dir: <dataset_dir>/images), which is what
encode_features.py looks for. Resumable: files already present (non-empty) are skipped; each download goes
to a hidden temporary name, is flushed to disk (fsync) and renamed only when complete, so a kill or a power
cut never leaves a partial image under its final name. Each URL gets at most ``--retries`` extra
attempts with exponential back-off, except for permanent answers (HTTP 4xx but 408/429), which fail at once.
Failures are listed in ``<image_dir>/failed.tsv`` (token, url, reason) and summarised; they never stop the
run. Items without a URL are counted. The images are checked only for being non-empty: unreadable files
are caught (and masked) by encode_features.py.
"""
import argparse
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset_conversion.common import log, read_item2index, read_item_table, run_converter, write_table  # noqa: E402
from recbole_mm.utils.atomic import atomic_path  # noqa: E402

USER_AGENT = "recbole-mm-image-downloader/0.1"
RETRYABLE_HTTP = {408, 429}


def urls_from_dataset(dataset_dir, dataset):
    """(token, url) for every item2index row; url '' when the .item file has none."""
    urls = read_item_table(dataset_dir, dataset).get("image_url")
    if urls is None:
        raise ValueError(f"{Path(dataset_dir) / (dataset + '.item')} has no image_url field; use --url_list instead")
    return [(token, urls.get(token, "")) for token in read_item2index(dataset_dir, dataset)]


def urls_from_list(path):
    """(token, url) per line; a token listed twice (two images would race for one file) or a list without
    any line is an error naming the file."""
    pairs, line_of_token = [], {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or not parts[0].strip():
                raise ValueError(f"{path}:{line_number}: expected '<item token>\\t<url>', got {line!r}")
            if parts[0] in line_of_token:
                raise ValueError(f"{path}:{line_number}: item {parts[0]!r} is listed again (first on line "
                                 f"{line_of_token[parts[0]]}); keep one URL per item")
            line_of_token[parts[0]] = line_number
            pairs.append((parts[0], parts[1].strip()))
    if not pairs:
        raise ValueError(f"{path} lists no '<item token>\\t<url>' line; nothing to download")
    return pairs


def target_path(image_dir, token, url):
    suffix = Path(urlparse(url).path).suffix.lower()
    return Path(image_dir) / f"{token}{suffix if suffix in {'.jpg', '.jpeg', '.png', '.webp', '.gif'} else '.jpg'}"


class EmptyResponse(Exception):
    """The server answered with no bytes: nothing is kept under the final name."""


def fetch(url, destination, retries, backoff, timeout):
    """Download url to destination; returns None on success or the last failure reason.

    The bytes go through ``atomic_path`` (a temporary file beside the target, fsynced, renamed, the
    folder fsynced), so after a kill or a power cut a file under its final name is a complete download:
    the resume rule (a non-empty file is done) never keeps half an image."""
    reason = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(request, timeout=timeout) as response, atomic_path(destination) as partial:
                with open(partial, "wb") as handle:
                    while block := response.read(1 << 16):
                        handle.write(block)
                if partial.stat().st_size == 0:
                    raise EmptyResponse
            return None
        except EmptyResponse:
            reason = "empty response"
        except urllib.error.HTTPError as error:
            reason = f"HTTP {error.code}"
            if 400 <= error.code < 500 and error.code not in RETRYABLE_HTTP:
                break
        except (urllib.error.URLError, OSError, ValueError) as error:  # DNS, refused, timeout, bad URL
            reason = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
    return reason


def download(pairs, image_dir, retries=3, backoff=1.0, timeout=15.0, workers=8, show_progress=True):
    """Returns counts {downloaded, already_present, failed, no_url} and writes image_dir/failed.tsv."""
    from tqdm import tqdm

    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    counts = {"downloaded": 0, "already_present": 0, "failed": 0, "no_url": 0}
    todo = []
    for token, url in pairs:
        if not url:
            counts["no_url"] += 1
            continue
        destination = target_path(image_dir, token, url)
        if destination.exists() and destination.stat().st_size > 0:
            counts["already_present"] += 1
        else:
            todo.append((token, url, destination))
    failures = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda job: fetch(job[1], job[2], retries, backoff, timeout), todo)
        for (token, url, _), reason in tqdm(zip(todo, results), total=len(todo), desc="images",
                                            disable=not show_progress):
            if reason is None:
                counts["downloaded"] += 1
            else:
                counts["failed"] += 1
                failures.append((token, url, reason))
    write_table(image_dir / "failed.tsv", ["token", "url", "reason"], failures)
    log(f"images in {image_dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
        + (f"; failures listed in {image_dir / 'failed.tsv'}" if failures else ""))
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset_dir", help="converted dataset folder: URLs from <Dataset>.item's image_url")
    source.add_argument("--url_list", help="tab-separated '<item token>\\t<url>' file")
    parser.add_argument("--dataset", help="dataset name (default: the folder name)")
    parser.add_argument("--image_dir", help="output folder (default: <dataset_dir>/images)")
    parser.add_argument("--retries", type=int, default=3, help="extra attempts per URL (default 3)")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each time")
    parser.add_argument("--timeout", type=float, default=15.0)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args(argv)
    if args.dataset_dir:
        dataset = args.dataset or Path(args.dataset_dir).resolve().name
        pairs = urls_from_dataset(args.dataset_dir, dataset)
        image_dir = args.image_dir or Path(args.dataset_dir) / "images"
    else:
        if not args.image_dir:
            parser.error("--url_list needs --image_dir")
        pairs, image_dir = urls_from_list(args.url_list), args.image_dir
    download(pairs, image_dir, args.retries, args.backoff, args.timeout, args.workers)


if __name__ == "__main__":
    sys.exit(run_converter(main))
