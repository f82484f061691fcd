"""The fault and hostile-input matrix: every case run through the real `cammsr` command on a scratch project.

    python -m benchmarks.faults [--out-dir data/bench/faults] [--only NAME,NAME] [--quick]

A scratch project (params.yaml, a generated Amazon-2018 catalog, and an ``outside/`` folder beside it holding
a canary image) is built under ``--out-dir``. Each case runs ``cammsr ...`` in a subprocess, against local
files or a loopback server that misbehaves on request (`benchmarks.fault_server`), and checks what a user
would: the exit code and the one error line, that no valid row is lost (against a reference count of the
source's valid reviews, or against an uninterrupted run), that the previous outputs survive a refused run,
that nothing was read from outside the catalog (the canary is never stored) and that no file outside the
project's ``data/`` was written (a snapshot of the scratch folder before and after). ``--quick`` leaves out
the two kills that load models (encode, train). Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.fault_server import FaultServer

REPO = Path(__file__).resolve().parents[1]
T_WINDOW = (788_918_400, int(time.time()) + 86400)  # ingest's default window: 1995-01-01 .. now + 1 day
HEAVY = ("kill: encode between chunks", "kill: train after an epoch")


@dataclass
class Outcome:
    ok: bool
    note: str
    rows_lost: int = 0


class Failed(AssertionError):
    """A check of a case did not hold; the message is the table's note."""


def check(condition: bool, note: str) -> None:
    if not condition:
        raise Failed(note)


@dataclass
class Run:
    code: int
    out: str

    @property
    def error(self) -> str:
        lines = [x for x in self.out.splitlines() if x.startswith("error: ")]
        return lines[-1] if lines else ""


class Scratch:
    """The scratch project, its sources and the loopback server the cases share."""

    def __init__(self, base: Path) -> None:
        from cammsr.core.config import DemoParams
        from demo.generate import generate_demo

        shutil.rmtree(base, ignore_errors=True)
        self.base, self.root, self.outside = base, base / "project", base / "outside"
        self.root.mkdir(parents=True)
        self.outside.mkdir()
        self.canary = _png((3, 1, 4))
        (self.outside / "canary.png").write_bytes(self.canary)
        generate_demo(self.root / "src", DemoParams(n_users=200, n_items=60, n_categories=3, mean_length=8.0,
                                                    image_size=16, seed=3))
        self.reviews = (self.root / "src/reviews_Demo_5.json.gz").read_bytes()
        self.meta = (self.root / "src/meta_Demo.json.gz").read_bytes()
        self.server = FaultServer()
        self.catalogs: dict[str, dict] = {}
        self.outside_writes = 0  # files outside project/data/ that a `cammsr` run created or changed

    # ------------------------------------------------------------------------------------------- helpers

    def params(self, catalogs: dict[str, dict], overrides: dict | None = None, raw: bool = False) -> None:
        """Write params.yaml: the code's defaults, exactly ``catalogs``, then ``overrides`` (not validated: a case
        may want a bad value)."""
        import yaml

        from cammsr.core.config import Params

        good = {k: v for k, v in catalogs.items() if k.replace("-", "").replace("_", "").isalnum()} or \
            {"x": {"reviews": "file:x"}}
        data = Params(catalogs=good).model_dump(mode="json")
        data["catalogs"] = catalogs
        data["ingest"].update({"retries": 3, "timeout_s": 2.0, "concurrency": 2, "max_quarantine_fraction": 0.2})
        data["project"]["device"] = "cpu"
        for section, values in (overrides or {}).items():
            data[section].update(values)
        (self.root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))

    def cammsr(self, *args: str, kill_when: Callable[[], bool] | None = None, shim: list[str] | None = None,
               timeout: float = 600) -> Run:
        env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "250", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        head = [sys.executable, "-m", "benchmarks.fault_server", *shim] if shim else [sys.executable, "-m",
                                                                                         "cammsr.cli"]
        with self.watching():
            proc = subprocess.Popen([*head, *args], cwd=self.root, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            if kill_when is not None:
                deadline = time.monotonic() + timeout
                while not kill_when():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        out = proc.communicate()[0]
                        raise Failed(f"the kill point was never reached (exit {proc.returncode}): {out[-300:]}")
                    time.sleep(0.02)
                proc.send_signal(signal.SIGKILL)
            out = proc.communicate(timeout=timeout)[0]
        return Run(proc.returncode, out)

    @contextlib.contextmanager
    def watching(self):
        """Count the files outside project/data/ that change while the block runs (`cammsr` runs only)."""
        before = self.snapshot()
        try:
            yield
        finally:
            after = self.snapshot()
            self.outside_writes += sum(1 for k, v in after.items() if before.get(k) != v)

    def ok(self, *args: str, **kw) -> Run:
        run = self.cammsr(*args, **kw)
        check(run.code == 0, f"exit {run.code}: {run.error or run.out[-200:]}")
        return run

    def catalog(self, name: str) -> Path:
        return self.root / "data" / name

    def rows(self, name: str) -> int:
        path = self.catalog(name) / "interactions.parquet"
        return pq.read_metadata(path).num_rows if path.exists() else 0

    def local(self, folder: str, reviews: bytes, meta: bytes | None = None) -> dict:
        """A catalog of local files under ``project/<folder>`` (images, when meta names them, beside it)."""
        src = self.root / folder
        if folder != "src":
            shutil.rmtree(src, ignore_errors=True)
            shutil.copytree(self.root / "src", src)
        (src / "reviews_Demo_5.json.gz").write_bytes(reviews)
        if meta is not None:
            (src / "meta_Demo.json.gz").write_bytes(meta)
        return {"reviews": f"file:{folder}/reviews_Demo_5.json.gz", "meta": f"file:{folder}/meta_Demo.json.gz",
                "images": True, "source_dep": folder}

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """Every file of the scratch folder outside the project's data/ (size, mtime)."""
        out = {}
        for path in self.base.rglob("*"):
            rel = path.relative_to(self.base)
            if rel.parts[:2] == ("project", "data") or not path.is_file():
                continue
            out[rel.as_posix()] = (path.stat().st_size, path.stat().st_mtime_ns)
        return out


def _png(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def lines_of(gz: bytes) -> list[bytes]:
    return gzip.decompress(gz).splitlines()


def gz(lines: list[bytes]) -> bytes:
    return gzip.compress(b"\n".join(lines) + b"\n", mtime=0)


def expected_rows(reviews: bytes) -> int:
    """Valid reviews in a 2014/2018 file, counted without cammsr: JSON objects with string ids and an integer
    time inside ingest's window, exact (user, item, time) duplicates once."""
    keys = set()
    for line in lines_of(reviews):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(rec, dict):
            continue
        user, item, ts = rec.get("reviewerID"), rec.get("asin"), rec.get("unixReviewTime")
        if isinstance(user, str) and user.strip() and isinstance(item, str) and item.strip() \
                and isinstance(ts, int) and T_WINDOW[0] <= ts <= T_WINDOW[1]:
            keys.add((user.strip(), item.strip(), ts))
    return len(keys)


def tables(catalog: Path) -> dict[str, object]:
    return {n: pq.read_table(catalog / n) for n in ("interactions.parquet", "items.parquet", "images.parquet")}


def leftovers(catalog: Path) -> list[str]:
    return sorted(p.relative_to(catalog).as_posix() for p in catalog.rglob("*")
                  if p.name.startswith(".") or p.name.endswith((".part", ".validator", ".parts", ".tmp")))


def statuses(catalog: Path) -> dict[str, str]:
    t = pq.read_table(catalog / "images.parquet")
    return dict(zip(t["item_id"].to_pylist(), t["status"].to_pylist(), strict=True))


def stored_shas(catalog: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in (catalog / "images").rglob("*") if p.is_file()}


def one_line(run: Run, code: int, *fragments: str) -> None:
    check(run.code == code, f"exit {run.code}, expected {code}: {run.error or run.out[-300:]}")
    check("Traceback" not in run.out and "Aborted" not in run.out, "a traceback instead of one line")
    for fragment in fragments:
        check(fragment in run.error, f"error line lacks {fragment!r}: {run.error!r}")


def with_meta_images(s: Scratch, urls: dict[str, str]) -> bytes:
    """The demo metadata with the image URL of some items replaced."""
    out = []
    for line in lines_of(s.meta):
        rec = json.loads(line)
        if rec["asin"] in urls:
            rec.pop("imageURLHighRes", None), rec.pop("imageURL", None)
            rec["imUrl"] = urls[rec["asin"]]
        out.append(json.dumps(rec).encode())
    return gz(out)


# ------------------------------------------------------------------------------------------------ cases


def clean_ingest(s: Scratch) -> Outcome:
    s.catalogs = {"demo": s.local("src", s.reviews)}
    s.params(s.catalogs)
    s.ok("ingest", "--catalog", "demo")
    want = expected_rows(s.reviews)
    ok_images = sum(v == "ok" for v in statuses(s.catalog("demo")).values())
    check(ok_images > 50, f"only {ok_images} images ok")
    return Outcome(True, f"{s.rows('demo')} rows, {ok_images} images", want - s.rows("demo"))


def image_urls_outside(s: Scratch) -> Outcome:
    asins = [json.loads(x)["asin"] for x in lines_of(s.meta)[:6]]
    hostile = dict(zip(asins, ["/etc/passwd", "file:///etc/passwd", "../../outside/canary.png",
                               (s.outside / "canary.png").as_uri(), "images/link.png", "ftp://127.0.0.1/x.png"],
                           strict=True))
    entry = s.local("hostile_img", s.reviews, with_meta_images(s, hostile))
    (s.root / "hostile_img/images/link.png").symlink_to(s.outside / "canary.png")
    s.params({"img": entry})
    s.ok("ingest", "--catalog", "img")
    status = statuses(s.catalog("img"))
    refused = [a for a in asins if status.get(a, "").startswith("failed: refused: ")]
    check(len(refused) == 6, f"refused {len(refused)} of 6: {[status.get(a) for a in asins]}")
    check(hashlib.sha256(s.canary).hexdigest() not in stored_shas(s.catalog("img")), "the canary was copied in")
    return Outcome(True, "6 of 6 refused, nothing read", expected_rows(s.reviews) - s.rows("img"))


def http_meta_local_image(s: Scratch) -> Outcome:
    asin = json.loads(lines_of(s.meta)[0])["asin"]
    meta = with_meta_images(s, {asin: (s.outside / "canary.png").as_uri()})
    reviews = s.server.route("/hm/reviews.json.gz", s.reviews)
    s.server.route("/hm/meta.json.gz", meta)
    for image in (s.root / "src/images").iterdir():
        s.server.route(f"/hm/images/{image.name}", image.read_bytes())
    s.params({"hm": {"reviews": reviews, "meta": s.server.url("/hm/meta.json.gz"), "images": True,
                     "source_dep": reviews}})
    s.ok("ingest", "--catalog", "hm")
    status = statuses(s.catalog("hm"))[asin]
    check(status.startswith("failed: refused: a local path named by metadata"), status)
    check(hashlib.sha256(s.canary).hexdigest() not in stored_shas(s.catalog("hm")), "the canary was copied in")
    return Outcome(True, "refused; the others fetched over http", expected_rows(s.reviews) - s.rows("hm"))


def millisecond_times(s: Scratch) -> Outcome:
    lines = lines_of(s.reviews)
    bad = 0
    for k in range(0, len(lines), 20):
        with contextlib.suppress(ValueError):
            rec = json.loads(lines[k])
            rec["unixReviewTime"] *= 1000
            lines[k], bad = json.dumps(rec).encode(), bad + 1
    reviews = gz(lines)
    s.params({"ms": s.local("ms", reviews) | {"images": False}})
    s.ok("ingest", "--catalog", "ms")
    summary = json.loads((s.catalog("ms") / "summaries/ingest.json").read_text())["counts"]
    check(summary["out_of_window"] == bad, f"{summary['out_of_window']} of {bad} quarantined")
    dry = s.cammsr("onboard", "ms2", "--reviews", "file:ms/reviews_Demo_5.json.gz", "--dry-run",
                   "--min-interactions", "1")
    check(f"{bad} reviews dated outside" in dry.out, "onboarding does not report them")
    return Outcome(True, f"{bad} quarantined with the reason, reported", expected_rows(reviews) - s.rows("ms"))


def deep_nesting(s: Scratch) -> Outcome:
    lines = lines_of(s.reviews)
    lines.insert(len(lines) // 2, b"[" * 200_000 + b"]" * 200_000)
    lines.insert(10, b'{"reviewerID": ' * 60_000 + b"1" + b"}" * 60_000)
    reviews = gz(lines)
    s.params({"deep": s.local("deep", reviews) | {"images": False}})
    s.ok("ingest", "--catalog", "deep")
    reasons = [json.loads(x)["reason"] for x in (s.catalog("deep") / "quarantine.jsonl").read_text().splitlines()]
    check(sum("nested too deeply" in r for r in reasons) == 2, f"quarantine: {reasons}")
    return Outcome(True, "2 lines quarantined, the rest ingested", expected_rows(reviews) - s.rows("deep"))


def refused_source(kind: str) -> Callable[[Scratch], Outcome]:
    def case(s: Scratch) -> Outcome:
        entry = s.local(f"bad_{kind}", s.reviews) | {"images": False}
        s.params({"bad": entry})
        s.ok("ingest", "--catalog", "bad")
        before = {p.name: p.read_bytes() for p in s.catalog("bad").glob("*.parquet")}
        rows = s.rows("bad")
        target = s.root / f"bad_{kind}/reviews_Demo_5.json.gz"
        records = [json.loads(x) for x in lines_of(s.reviews)[1:40]]
        data = {"truncated gzip": s.reviews[: len(s.reviews) // 2], "empty file": b"",
                "JSON array file": gzip.compress(json.dumps(records, indent=1).encode())}[kind]
        target.write_bytes(data)
        run = s.cammsr("ingest", "--catalog", "bad")
        fragment = {"truncated gzip": "unreadable, gzip stream cut short", "empty file": "is empty (no records)",
                    "JSON array file": "a JSON array? expected JSON Lines"}[kind]
        one_line(run, 2, fragment)
        check({p.name: p.read_bytes() for p in s.catalog("bad").glob("*.parquet")} == before,
              "the previous outputs changed")
        return Outcome(True, run.error[7:90] + "...", rows - s.rows("bad"))

    return case


def escaping_name(s: Scratch) -> Outcome:
    s.params({"../escaped": {"reviews": "file:src/reviews_Demo_5.json.gz", "images": False}})
    run = s.cammsr("ingest", "--catalog", "../escaped")
    one_line(run, 2, "catalog name", "use letters, digits")
    check(not (s.root / "escaped").exists(), "a folder beside the project")
    return Outcome(True, "refused at load")


def loose_params(s: Scratch) -> Outcome:
    s.params({"demo": s.local("src", s.reviews)}, {"train": {"lr": "0.001", "use_text": "no"}})
    run = s.cammsr("ingest", "--catalog", "demo")
    one_line(run, 2, "train.lr: Input should be a valid number", "train.use_text: Input should be a valid boolean")
    return Outcome(True, "lr: '0.001', use_text: 'no' refused")


def small_catalog(s: Scratch) -> Outcome:
    (s.root / "small").mkdir(exist_ok=True)
    lines = [json.dumps({"reviewerID": f"u{u}", "asin": f"I{(u + j) % 20}", "overall": 4.0,
                         "unixReviewTime": 1_400_000_000 + 86400 * j}) for u in range(30) for j in range(3)]
    (s.root / "small/reviews.json.gz").write_bytes(gz([x.encode() for x in lines]))
    s.params({"demo": s.local("src", s.reviews)})
    before = (s.root / "params.yaml").read_bytes()
    run = s.cammsr("onboard", "small", "--reviews", "file:small/reviews.json.gz", "--images", "no", "--dry-run")
    one_line(run, 2, "5/5-core keeps 0 of 90", "--min-interactions 3")
    again = s.ok("onboard", "small", "--reviews", "file:small/reviews.json.gz", "--images", "no", "--dry-run",
                 "--min-interactions", "3")
    check("+    min_interactions: 3" in again.out, "the diff lacks min_interactions")
    check((s.root / "params.yaml").read_bytes() == before, "params.yaml changed")
    undo = s.cammsr("onboard", "demo", "--undo")
    one_line(undo, 2, "was not added by `cammsr onboard`")
    check((s.root / "params.yaml").read_bytes() == before, "params.yaml changed by --undo")
    return Outcome(True, "refused with --min-interactions 3; accepted with it")


def redirect_loop(s: Scratch) -> Outcome:
    asin = json.loads(lines_of(s.meta)[0])["asin"]
    s.server.route("/loop.png", b"", faults=["loop"] * 100)
    entry = s.local("loop", s.reviews, with_meta_images(s, {asin: s.server.url("/loop.png")}))
    s.params({"loop": entry})
    run = s.ok("ingest", "--catalog", "loop")
    status = statuses(s.catalog("loop"))[asin]
    check(status == "failed: network error: too many redirects (a redirect loop?)", status)
    check("unexpected error" not in run.out and "Traceback" not in run.out, "logged as unexpected")
    return Outcome(True, "failed: network error: too many redirects")


def served(s: Scratch, name: str, faults: list[str], swap_to: bytes | None = None,
           timeout_s: float = 2.0) -> tuple[str, bytes]:
    url = s.server.route(f"/{name}/reviews.json.gz", s.reviews, faults, swap_to)
    s.params({name: {"reviews": url, "images": False, "source_dep": url}}, {"ingest": {"timeout_s": timeout_s}})
    return url, swap_to or s.reviews


def download_fault(name: str, faults: list[str], swap: bool = False, timeout_s: float = 2.0
                   ) -> Callable[[Scratch], Outcome]:
    def case(s: Scratch) -> Outcome:
        v2 = gz(lines_of(s.reviews)[::-1]) if swap else None
        _, final = served(s, name, faults, v2, timeout_s)
        started = time.monotonic()
        s.ok("ingest", "--catalog", name)
        raw = [p for p in (s.catalog(name) / "raw").iterdir() if p.name.endswith("reviews.json.gz")]
        check(len(raw) == 1 and raw[0].read_bytes() == final, "the raw file is not the source, byte for byte")
        check(not leftovers(s.catalog(name)), f"left behind: {leftovers(s.catalog(name))}")
        return Outcome(True, f"sha256 matches ({time.monotonic() - started:.1f} s, "
                             f"{s.server.routes[f'/{name}/reviews.json.gz'].requests} requests)",
                       expected_rows(final) - s.rows(name))

    return case


def server_down(s: Scratch) -> Outcome:
    served(s, "down", [])
    s.ok("ingest", "--catalog", "down")
    rows, before = s.rows("down"), (s.catalog("down") / "interactions.parquet").read_bytes()
    s.server.routes["/down/reviews.json.gz"].faults = ["503"] * 10
    run = s.cammsr("ingest", "--catalog", "down")
    one_line(run, 1, "gave up after 4 attempts")
    check((s.catalog("down") / "interactions.parquet").read_bytes() == before, "the previous outputs changed")
    return Outcome(True, "exit 1 after the retry budget, outputs kept", rows - s.rows("down"))


def storage_fault(code: str) -> Callable[[Scratch], Outcome]:
    def case(s: Scratch) -> Outcome:
        s.params({"disk": s.local("disk", s.reviews)})
        s.ok("ingest", "--catalog", "disk")
        catalog = s.catalog("disk")
        before = {n: (catalog / n).read_bytes() for n in ("interactions.parquet", "items.parquet", "images.parquet")}
        rows = s.rows("disk")
        shutil.rmtree(catalog / "images")  # every image has to be written again
        (catalog / "images").mkdir()
        how, run = _fill(s, code, catalog / "images")
        fragment = "no space left" if code == "ENOSPC" else "permission denied"
        one_line(run, 1, fragment, "previous outputs are intact")
        check({n: (catalog / n).read_bytes() for n in before} == before, "the previous outputs changed")
        return Outcome(True, f"{how}: exit 1, outputs kept", rows - s.rows("disk"))

    return case


def _fill(s: Scratch, code: str, images: Path) -> tuple[str, Run]:
    """ENOSPC from a real 64 KiB tmpfs mounted on images/ when this process may mount, else injected."""
    import errno

    if code == "ENOSPC" and os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(images)],
                                 capture_output=True).returncode == 0
        if mounted:
            try:
                (images / "filler").write_bytes(b"\0" * 60_000)
                return "real full tmpfs", s.cammsr("ingest", "--catalog", "disk")
            finally:
                subprocess.run(["umount", str(images)], check=False)
    number = errno.ENOSPC if code == "ENOSPC" else errno.EACCES
    return f"{code} injected", s.cammsr("ingest", "--catalog", "disk", shim=[str(number), "5"])


def concurrent_ingests(s: Scratch) -> Outcome:
    url, _ = served(s, "twice", ["stall:0.5"], timeout_s=30)
    env_run = [sys.executable, "-m", "cammsr.cli", "ingest", "--catalog", "twice"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "250"}
    s.server.stalled.clear()
    s.server.released.clear()
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        started.append(subprocess.Popen(env_run, cwd=s.root, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True))
        return started[-1]

    with s.watching():
        try:
            first = start()
            deadline = time.monotonic() + 120
            while not s.server.stalled.is_set():
                check(first.poll() is None and time.monotonic() < deadline,
                      "the first ingest never started downloading")
                time.sleep(0.02)
            busy = s.cammsr("ingest", "--catalog", "twice", "--no-wait")
            one_line(busy, 1, "another run is writing these outputs")
            second = start()
            time.sleep(3)
            s.server.release()
            outs = [p.communicate(timeout=300)[0] for p in (first, second)]
        finally:  # never leave a process behind, whatever failed
            s.server.release()
            for proc in started:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    check(first.returncode == 0 and second.returncode == 0, f"exits {first.returncode}, {second.returncode}: "
                                                            f"{outs[1][-300:]}")
    check("waiting for it to finish" in outs[1], "the second did not say it waits")
    check(not leftovers(s.catalog("twice")), f"left behind: {leftovers(s.catalog('twice'))}")
    return Outcome(True, "the second waited; --no-wait: exit 1", expected_rows(s.reviews) - s.rows("twice"))


def kill_ingest(where: str) -> Callable[[Scratch], Outcome]:
    def case(s: Scratch) -> Outcome:
        name = {"reviews download": "kdl", "images": "kimg", "parsing": "kparse"}[where]
        reviews = s.reviews
        if where == "parsing":  # big enough that parsing takes seconds
            from benchmarks.ingest import write_catalog

            big, _ = write_catalog(s.base / "big", scale=1, base_users=6000)
            reviews = big.read_bytes()
        url = s.server.route(f"/{name}/reviews.json.gz", reviews)
        s.server.route(f"/{name}/meta.json.gz", s.meta)
        images = sorted((s.root / "src/images").iterdir())
        for image in images:
            s.server.route(f"/{name}/images/{image.name}", image.read_bytes())
        entry = {"reviews": url, "meta": s.server.url(f"/{name}/meta.json.gz"), "images": where != "parsing",
                 "source_dep": url}
        clean = f"{name}-clean"
        s.params({name: entry, clean: entry})
        s.ok("ingest", "--catalog", clean)
        s.server.stalled.clear()
        s.server.released.clear()
        catalog = s.catalog(name)
        if where == "reviews download":
            s.server.routes[f"/{name}/reviews.json.gz"].faults = ["stall:0.5"]
            when = s.server.stalled.is_set
        elif where == "images":
            s.server.routes[f"/{name}/images/{images[len(images) // 2].name}"].faults = ["stall:0.5"]
            when = s.server.stalled.is_set
        else:
            def when() -> bool:
                return any(p.name.startswith(".interactions.parquet.") for p in catalog.rglob("*"))
        killed = s.cammsr("ingest", "--catalog", name, kill_when=when)
        check(killed.code == -signal.SIGKILL, f"exit {killed.code}")
        left = len(leftovers(catalog))
        s.server.release()
        s.ok("ingest", "--catalog", name)
        a, b = tables(catalog), tables(s.catalog(clean))
        check(all(a[k].equals(b[k]) for k in a), "the rerun's tables differ from an uninterrupted run's")
        check(not leftovers(catalog), f"left behind: {leftovers(catalog)}")
        if where != "parsing":
            images_a = {p.name for p in (catalog / "images").rglob("*") if p.is_file()}
            check(images_a == {p.name for p in (s.catalog(clean) / "images").rglob("*") if p.is_file()},
                  "the stored images differ")
        return Outcome(True, f"{left} temp files after the kill, 0 after the rerun; tables equal",
                       s.rows(clean) - s.rows(name))

    return case


def kill_encode(s: Scratch) -> Outcome:
    entry = s.local("src", s.reviews) | {"images": False}
    s.params({"enc": entry, "cleanenc": entry}, {"features": {"chunk_size": 8}})
    for name in ("enc", "cleanenc"):
        s.ok("ingest", "--catalog", name)
    s.ok("encode", "--catalog", "cleanenc", "--modality", "text")
    parts = s.catalog("enc") / "features/text.parquet.parts"
    killed = s.cammsr("encode", "--catalog", "enc", "--modality", "text",
                      kill_when=lambda: len(list(parts.glob("part-*.parquet"))) >= 2)
    check(killed.code == -signal.SIGKILL, f"exit {killed.code}")
    s.ok("encode", "--catalog", "enc", "--modality", "text")
    from features.store import read_rows

    a, b = (read_rows(s.catalog(n) / "features/text.parquet") for n in ("enc", "cleanenc"))
    check(a.item_ids == b.item_ids and a.shas == b.shas, "the stores hold other rows")
    check(float(abs(a.embeddings - b.embeddings).max()) < 1e-5, "the embeddings differ")
    check(not leftovers(s.catalog("enc")), f"left behind: {leftovers(s.catalog('enc'))}")
    resumed = json.loads((s.catalog("enc") / "summaries/encode_text.json").read_text())["counts"]["resumed"]
    return Outcome(True, f"{resumed} rows resumed; store equal", len(b.item_ids) - len(a.item_ids))


def kill_train(s: Scratch) -> Outcome:
    import torch

    entry = s.local("src", s.reviews) | {"images": False}
    over = {"train": {"model": "sasrec", "epochs": 3, "patience": 5, "num_threads": 1, "hidden_size": 16,
                      "num_layers": 1, "num_heads": 1, "ffn_size": 32, "batch_size": 64}}
    s.params({"tr": entry, "cleantr": entry}, over)
    for name in ("tr", "cleantr"):
        s.ok("ingest", "--catalog", name)
        s.ok("split", "--catalog", name)
    s.ok("train", "--catalog", "cleantr")
    last = s.catalog("tr") / "models/last.pt"
    killed = s.cammsr("train", "--catalog", "tr", kill_when=last.exists)
    check(killed.code == -signal.SIGKILL, f"exit {killed.code}")
    s.ok("train", "--catalog", "tr")
    a = torch.load(s.catalog("tr") / "models/model.pt", weights_only=True)["state_dict"]
    b = torch.load(s.catalog("cleantr") / "models/model.pt", weights_only=True)["state_dict"]
    check(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the checkpoints differ")
    check(not leftovers(s.catalog("tr")), f"left behind: {leftovers(s.catalog('tr'))}")
    return Outcome(True, "checkpoint equal to an uninterrupted run's")


CASES: list[tuple[str, Callable[[Scratch], Outcome]]] = [
    ("clean ingest (reference)", clean_ingest),
    ("image URLs outside the catalog", image_urls_outside),
    ("local image named by http metadata", http_meta_local_image),
    ("review times in milliseconds", millisecond_times),
    ("deeply nested lines", deep_nesting),
    ("truncated gzip", refused_source("truncated gzip")),
    ("empty file", refused_source("empty file")),
    ("JSON array file", refused_source("JSON array file")),
    ("catalog name ../escaped", escaping_name),
    ("params lr: '0.001', use_text: 'no'", loose_params),
    ("small catalog onboarding", small_catalog),
    ("redirect loop (image)", redirect_loop),
    ("5xx burst", download_fault("burst", ["503", "500", "503"])),
    ("429 with Retry-After", download_fault("slowdown", ["429:1"])),
    ("slow drip (read timeout)", download_fault("drip", ["drip:0.4:3"], timeout_s=1.0)),
    ("connection reset mid-body", download_fault("reset", ["reset:0.5"])),
    ("body shorter than Content-Length", download_fault("short", ["short:0.3"])),
    ("file changed between attempts", download_fault("swap", ["short:0.5", "swap"], swap=True)),
    ("Range not supported", download_fault("norange", ["short:0.5", "norange"])),
    ("server down past the retry budget", server_down),
    ("disk full while storing images", storage_fault("ENOSPC")),
    ("permission denied while storing images", storage_fault("EACCES")),
    ("two ingests at once", concurrent_ingests),
    ("kill: reviews download", kill_ingest("reviews download")),
    ("kill: image download", kill_ingest("images")),
    ("kill: ingest while parsing", kill_ingest("parsing")),
    ("kill: encode between chunks", kill_encode),
    ("kill: train after an epoch", kill_train),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path("data/bench/faults"))
    ap.add_argument("--only", default="", help="comma-separated case names (substrings)")
    ap.add_argument("--quick", action="store_true", help="leave out the kills that load models")
    args = ap.parse_args()
    cases = [(n, f) for n, f in CASES if not (args.quick and n in HEAVY)]
    if args.only:
        cases = [(n, f) for n, f in cases if any(o.strip() in n for o in args.only.split(","))]
    scratch = Scratch(args.out_dir.resolve())
    rows = []
    print(f"{'case':<42} {'outcome':<9} {'rows lost':>9} {'outside writes':>14}  note", flush=True)
    try:
        for name, case in cases:
            scratch.outside_writes = 0
            started = time.monotonic()
            try:
                outcome = case(scratch)
            except Failed as exc:
                outcome = Outcome(False, str(exc))
            except Exception as exc:  # a bug in the case itself: reported, the matrix goes on
                outcome = Outcome(False, f"{type(exc).__name__}: {exc}")
            outside = scratch.outside_writes
            rows.append((name, outcome, outside))
            print(f"{name:<42} {'survived' if outcome.ok else 'FAILED':<9} {outcome.rows_lost:>9} {outside:>14}  "
                  f"{outcome.note[:100]} ({time.monotonic() - started:.0f} s)", flush=True)
    finally:
        scratch.server.close()
    print(json.dumps({"cases": len(rows), "survived": sum(o.ok and o.rows_lost == 0 and w == 0 for _, o, w in rows),
                      "rows_lost": sum(max(o.rows_lost, 0) for _, o, _ in rows),
                      "outside_writes": sum(w for _, _, w in rows)}))


if __name__ == "__main__":
    main()
