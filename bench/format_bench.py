"""Throughput and peak memory of file encryption: ppml-kms (format v1) against ``cp``, age and Fernet.

    python bench/format_bench.py                      # 1 GiB, 3 paired runs, every candidate
    python bench/format_bench.py --size 256M --runs 5 --candidates ppml-kms
    python bench/format_bench.py --candidates ppml-kms --segment-size 64K 256K 1M 4M

For each candidate and each direction (encrypt, decrypt), every run is a pair: ``cp`` of the same
input file, then the candidate; the table shows medians over the runs (and the best run). Every
command runs in its own child process, so its peak RSS is its own (GNU time %M). The page cache
cannot be dropped, so this measures CPU and page-cache throughput, not a disk: the input is read
once before every timed command (untimed), because on VMs with proactive reclaim (DAMON) a file
left alone for a few seconds drifts out of the cache. Before each pair the machine is given time to
go idle (``--wait-idle``) and dirty pages are synced; each command's output is deleted just before
the next command runs; a pair during which other processes used the CPUs is measured again
(``--retries``). Nothing calls fsync, neither cp nor the candidates.

Candidates:
  ppml-kms  the library's file API in a child process (``bench/_runner.py``):
            ``FileEncryptor.encrypt_file`` and ``envelope.decrypt_file`` (temporary file + rename),
            i.e. ``format.encrypt_stream``/``decrypt_stream``, with a fixed random data key and a
            stand-in KMS (no network).
  age       ``age -r`` / ``age -d -i`` with an X25519 identity from ``age-keygen``.
  fernet    what BigDL PPML did: read the whole file, one Fernet token, write (skipped above
            ``--fernet-max``, because it needs several times the file size in memory).

"work" times are measured inside the child around the encryption itself (Python start-up and
imports excluded); for native tools (cp, age) work = wall. "wall" is the whole child process.
Throughput is plaintext bytes per second, MB = 10**6 bytes; the ratio is t(cp) / t(candidate) per
pair, so 1.0 means as fast as cp. Results are printed and written as JSON to ``bench/out/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "_runner.py"
CHUNK = 16 << 20
MB = 1e6
MIB = 1 << 20


# -- helpers -----------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``1G``, ``256M``, ``64K``, ``1GiB`` or plain bytes (binary units)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if value and value[-1] in units:
        return int(float(value[:-1]) * units[value[-1]])
    return int(value)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_unit(n: int | None) -> str:
    """``65536`` -> ``64K``, ``1048576`` -> ``1M`` (segment sizes in candidate names)."""
    if n is None:
        return "default"
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def rss_text(kib: int | None) -> str:
    return "n/a" if kib is None else human(kib * 1024)


def max_or_none(values) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def make_random_file(path: Path, size: int) -> None:
    with open(path, "wb") as out:
        left = size
        while left:
            n = min(CHUNK, left)
            out.write(os.urandom(n))
            left -= n


def warm(path: Path) -> None:
    """Read ``path`` once so that every run finds it in the page cache."""
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def same_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(CHUNK), fb.read(CHUNK)
            if x != y:
                return False
            if not x:
                return True


def remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (other people's work, between runs)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except OSError:
        return float("nan")
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


class ForeignLoad:
    """CPU time used by other processes while we measure: /proc/stat minus our own (and children's).

    Kernel threads working for us (writeback, reclaim) count as foreign too, so the result is an
    upper bound; it tells a disturbed pair from a clean one.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
        ours = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            ours += usage.ru_utime + usage.ru_stime
        return time.monotonic(), busy, ours

    def fraction(self) -> float:
        """Foreign CPU use since creation, as a fraction of all CPUs over the elapsed time."""
        try:
            t1, busy1, ours1 = self._sample()
        except OSError:
            return float("nan")
        t0, busy0, ours0 = self._start
        return max(0.0, (busy1 - busy0) - (ours1 - ours0)) / max(1e-9, (t1 - t0) * os.cpu_count())


def wait_for_quiet(max_wait: float, threshold: float) -> float:
    """Wait (up to ``max_wait`` s) until the machine is mostly idle; return the last busy fraction."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy(1.0)
    return busy


@dataclass
class Run:
    wall: float
    work: float
    maxrss_kib: int | None
    setup: float | None = None


GNU_TIME = "/usr/bin/time"


def run_timed(cmd: list[str], *, expect_json: bool = False) -> Run:
    """Run ``cmd``; return wall time, work time and the peak RSS of that one process.

    The peak RSS comes from GNU time (``%M``, from wait4 in a small process): wait4 in this process
    would be wrong, because a child forked from a large parent keeps the parent's high-water mark
    across exec. Without GNU time, Python runners report their own VmHWM and others get none.
    """
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r", suffix=".rss") as rss,
    ):
        wrapper = [GNU_TIME, "-f", "%M", "-o", rss.name] if os.access(GNU_TIME, os.X_OK) else []
        start = time.perf_counter()
        proc = subprocess.run(
            wrapper + cmd, check=False, stdout=out, stderr=err, stdin=subprocess.DEVNULL
        )
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        rss_text = rss.read().strip()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {stderr.strip()[-500:]}")
    maxrss = int(rss_text.splitlines()[-1]) if wrapper and rss_text else None
    run = Run(wall=wall, work=wall, maxrss_kib=maxrss)
    if expect_json:
        report = json.loads(stdout.strip().splitlines()[-1])
        run.work, run.setup = report["seconds"], report["setup_seconds"]
        if run.maxrss_kib is None:
            run.maxrss_kib = report.get("self_peak_rss_kib")
    return run


def filesystem_of(path: Path) -> str | None:
    """File system type and mount options of ``path`` (longest matching mount point)."""
    best: tuple[int, str] | None = None
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                _, mount_point, fs_type, options, *_ = line.split()
                inside = str(path).startswith(mount_point.rstrip("/") + "/") or mount_point == "/"
                if inside and (best is None or len(mount_point) > best[0]):
                    best = (len(mount_point), f"{fs_type} ({options})")
    except OSError:
        return None
    return best[1] if best else None


def tool_version(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (
        (done.stdout or done.stderr).strip().splitlines()[0]
        if (done.stdout or done.stderr)
        else None
    )


def strace_cp(src: Path, dst: Path) -> dict[str, int] | None:
    """Which system calls ``cp`` uses to move the data (one untimed run under ``strace -c``)."""
    if not shutil.which("strace"):
        return None
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as log:
        done = subprocess.run(
            ["strace", "-f", "-c", "-o", log.name, "cp", str(src), str(dst)],
            check=False,
            capture_output=True,
        )
        remove(dst)
        if done.returncode != 0:
            return None
        calls = {}
        for line in Path(log.name).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[-1] in {
                "copy_file_range",
                "read",
                "write",
                "sendfile",
                "splice",
                "ioctl",
                "mmap",
            }:
                calls[parts[-1]] = int(parts[3])
        return calls


# -- candidates --------------------------------------------------------------------------------


@dataclass
class Candidate:
    name: str
    encrypt: list[str] = field(default_factory=list)  # command templates with {src} {dst}
    decrypt: list[str] = field(default_factory=list)
    python: bool = False  # reports its own work time (see _runner.py)


def candidates(
    args: argparse.Namespace, workdir: Path, key_file: Path
) -> tuple[list[Candidate], dict[str, str]]:
    chosen, skipped = [], {}
    py = [sys.executable, str(RUNNER)]
    for name in args.candidates:
        if name == "ppml-kms":
            try:
                import ppml_kms.format  # noqa: F401  (only checks that it is installed)
            except ImportError as exc:
                skipped[name] = f"ppml_kms is not importable by {sys.executable}: {exc}"
                continue
            for size in args.segment_size or [None]:
                seg = ["--segment-size", str(size)] if size else []
                chosen.append(
                    Candidate(
                        f"{name}/{human_unit(size)}" if len(args.segment_size or []) > 1 else name,
                        py + ["ppml-encrypt", "{src}", "{dst}", str(key_file)] + seg,
                        py + ["ppml-decrypt", "{src}", "{dst}", str(key_file)],
                        python=True,
                    )
                )
        elif name == "age":
            if not (shutil.which("age") and shutil.which("age-keygen")):
                skipped[name] = "age/age-keygen not installed (apt-get install -y age)"
                continue
            identity = workdir / "age-identity.txt"
            subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
            recipient = subprocess.run(
                ["age-keygen", "-y", str(identity)], check=True, capture_output=True, text=True
            ).stdout.strip()
            chosen.append(
                Candidate(
                    name,
                    ["age", "-r", recipient, "-o", "{dst}", "{src}"],
                    ["age", "-d", "-i", str(identity), "-o", "{dst}", "{src}"],
                )
            )
        elif name == "fernet":
            if args.size > args.fernet_max:
                skipped[name] = (
                    f"skipped above --fernet-max {human(args.fernet_max)}: whole-file Fernet needs "
                    "several times the file size in memory"
                )
                continue
            try:
                import cryptography.fernet  # noqa: F401
            except ImportError:
                skipped[name] = "the cryptography package is not installed"
                continue
            chosen.append(
                Candidate(
                    name,
                    py + ["fernet-encrypt", "{src}", "{dst}", str(key_file)],
                    py + ["fernet-decrypt", "{src}", "{dst}", str(key_file)],
                    python=True,
                )
            )
    return chosen, skipped


def fill(template: list[str], src: Path, dst: Path) -> list[str]:
    return [part.format(src=src, dst=dst) for part in template]


# -- measurement -------------------------------------------------------------------------------


def paired_runs(
    args: argparse.Namespace,
    cand: Candidate,
    op: str,
    src: Path,
    dst: Path,
    cp_dst: Path,
    plain_size: int,
) -> dict:
    template = cand.encrypt if op == "encrypt" else cand.decrypt
    src_size = src.stat().st_size
    pairs = []
    for i in range(args.runs):
        for attempt in range(args.retries + 1):
            busy = wait_for_quiet(args.wait_idle, args.idle_threshold)
            os.sync()
            load = ForeignLoad()
            warm(src)
            remove(dst, cp_dst)
            cp = run_timed(["cp", str(src), str(cp_dst)])
            warm(src)
            remove(cp_dst)
            run = run_timed(fill(template, src, dst), expect_json=cand.python)
            foreign = load.fraction()
            if i < args.runs - 1:
                remove(dst)
            if foreign <= args.idle_threshold:
                break
            print(
                f"  {cand.name} {op} run {i + 1}: other processes used {foreign:.0%} of the CPUs "
                + ("meanwhile; measuring again" if attempt < args.retries else "; kept, noisy"),
                flush=True,
            )
        pair = {
            "cpu_busy_before": round(busy, 3),
            "foreign_cpu_during": round(foreign, 3),
            "attempts": attempt + 1,
            "cp_seconds": cp.wall,
            "cp_maxrss_kib": cp.maxrss_kib,
            "wall_seconds": run.wall,
            "work_seconds": run.work,
            "setup_seconds": run.setup,
            "maxrss_kib": run.maxrss_kib,
            "ratio_work": cp.wall / run.work,
            "ratio_wall": cp.wall / run.wall,
        }
        pairs.append(pair)
        print(
            f"  {cand.name:12s} {op:7s} run {i + 1}/{args.runs}: cp {cp.wall:6.3f} s, "
            f"{cand.name} work {run.work:6.3f} s wall {run.wall:6.3f} s, "
            f"ratio {pair['ratio_work']:.2f} (wall {pair['ratio_wall']:.2f}), "
            f"peak RSS {rss_text(run.maxrss_kib)}, foreign CPU {foreign:.0%}",
            flush=True,
        )
    med = statistics.median
    return {
        "op": op,
        "input_bytes": src_size,
        "plaintext_bytes": plain_size,
        "runs": pairs,
        "median": {
            "cp_MBps": src_size / med(p["cp_seconds"] for p in pairs) / MB,
            "work_MBps": plain_size / med(p["work_seconds"] for p in pairs) / MB,
            "wall_MBps": plain_size / med(p["wall_seconds"] for p in pairs) / MB,
            "ratio_work": med(p["ratio_work"] for p in pairs),
            "ratio_wall": med(p["ratio_wall"] for p in pairs),
            "setup_seconds": med(p["setup_seconds"] for p in pairs) if cand.python else None,
        },
        "best": {
            "cp_MBps": src_size / min(p["cp_seconds"] for p in pairs) / MB,
            "work_MBps": plain_size / min(p["work_seconds"] for p in pairs) / MB,
            "ratio_work": min(p["cp_seconds"] for p in pairs)
            / min(p["work_seconds"] for p in pairs),
        },
        "peak_rss_kib": max_or_none(p["maxrss_kib"] for p in pairs),
        "cp_peak_rss_kib": max_or_none(p["cp_maxrss_kib"] for p in pairs),
    }


def print_table(report: dict) -> None:
    print()
    print(
        f"size {human(report['size_bytes'])} ({report['size_bytes']} bytes), {report['runs']} paired runs, "
        f"medians; MB = 10^6 bytes; ratio = t(cp) / t(candidate) per pair;\n"
        f"best ratio = best cp time / best candidate time; work excludes Python start-up and imports"
    )
    head = (
        f"{'candidate':13s} {'op':8s} {'work MB/s':>10s} {'wall MB/s':>10s} {'cp MB/s':>9s} "
        f"{'ratio':>6s} {'ratio(wall)':>11s} {'best ratio':>10s} {'peak RSS':>10s} {'cp RSS':>8s}"
    )
    print(head)
    print("-" * len(head))
    for name, result in report["results"].items():
        for op in ("encrypt", "decrypt"):
            r = result[op]
            m = r["median"]
            print(
                f"{name:13s} {op:8s} {m['work_MBps']:10.0f} {m['wall_MBps']:10.0f} {m['cp_MBps']:9.0f} "
                f"{m['ratio_work']:6.2f} {m['ratio_wall']:11.2f} {r['best']['ratio_work']:10.2f} "
                f"{rss_text(r['peak_rss_kib']):>10s} "
                f"{rss_text(r['cp_peak_rss_kib']):>8s}"
            )
    for name, why in report["skipped"].items():
        print(f"{name:13s} skipped: {why}")
    if report.get("cp_syscalls"):
        print(f"cp system calls (strace -c, one extra untimed run): {report['cp_syscalls']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", type=parse_size, default=1 << 30, help="input size, e.g. 1G, 256M (default 1G)"
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="paired runs per measurement (default 3)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the temporary work directory is created (default: system temp dir)",
    )
    parser.add_argument(
        "--candidates",
        nargs="+",
        default=["ppml-kms", "age", "fernet"],
        choices=["ppml-kms", "age", "fernet"],
    )
    parser.add_argument(
        "--segment-size",
        type=parse_size,
        nargs="+",
        default=None,
        help="ppml-kms segment size; several sizes measure one ppml-kms candidate each "
        "(default: the library's DEFAULT_SEGMENT_SIZE)",
    )
    parser.add_argument(
        "--fernet-max",
        type=parse_size,
        default=1 << 30,
        help="skip Fernet above this size (default 1G)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=30.0,
        help="before each pair, wait up to this many seconds for other load to stop (default 30)",
    )
    parser.add_argument(
        "--idle-threshold",
        type=float,
        default=0.10,
        help="CPU busy fraction counted as idle for --wait-idle (default 0.10)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="measure a pair again (up to this many times) when other processes used more than "
        "--idle-threshold of the CPUs during it (default 3)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default bench/out/format_bench-<time>.json)",
    )
    args = parser.parse_args(argv)
    if shutil.which("cp") is None:
        parser.error("cp not found")

    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="format-bench-", dir=args.workdir))
    try:
        plain = workdir / "plain.bin"
        print(f"work dir {workdir}; writing {human(args.size)} of random data ...", flush=True)
        make_random_file(plain, args.size)
        os.sync()
        warm(plain)
        key_file = workdir / "data-key"
        key_file.write_bytes(os.urandom(32))
        key_file.chmod(0o600)
        chosen, skipped = candidates(args, workdir, key_file)
        for name, why in skipped.items():
            print(f"{name}: {why}", flush=True)

        import cryptography

        from ppml_kms.format import DEFAULT_SEGMENT_SIZE

        report: dict = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "size_bytes": args.size,
            "runs": args.runs,
            "segment_sizes": args.segment_size or [DEFAULT_SEGMENT_SIZE],
            "workdir_fs": filesystem_of(workdir),
            "machine": {
                "cpus": os.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "cryptography": cryptography.__version__,
                "cp": tool_version(["cp", "--version"]),
                "age": tool_version(["age", "--version"]),
            },
            "cp_syscalls": strace_cp(plain, workdir / "strace-copy.bin"),
            "skipped": skipped,
            "results": {},
        }
        for cand in chosen:
            encrypted = workdir / f"{cand.name}.enc"
            decrypted = workdir / f"{cand.name}.dec"
            copy = workdir / "cp-copy.bin"
            result = {
                "encrypt": paired_runs(args, cand, "encrypt", plain, encrypted, copy, args.size)
            }
            warm(encrypted)
            result["decrypt"] = paired_runs(
                args, cand, "decrypt", encrypted, decrypted, copy, args.size
            )
            result["encrypted_bytes"] = encrypted.stat().st_size
            result["round_trip_ok"] = same_content(plain, decrypted)
            if not result["round_trip_ok"]:
                print(f"  {cand.name}: DECRYPTED OUTPUT DIFFERS FROM THE INPUT", flush=True)
            remove(encrypted, decrypted, copy)
            report["results"][cand.name] = result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print_table(report)
    out = args.out or HERE / "out" / f"format_bench-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON: {out}")
    return 0 if all(r["round_trip_ok"] for r in report["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
