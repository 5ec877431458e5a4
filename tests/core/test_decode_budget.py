"""Decoding has a budget: compressed uploads that inflate far past their size are refused early and cheaply.

In process (core.imageio): a deflated DICOM and a ``.nii.gz`` bomb are refused with ``ImageTooLargeError``
while the decoding process's peak memory (``ru_maxrss`` of a fresh child process) stays within 200 MiB;
honest deflated DICOM and gzip NIfTI still decode. The decode pool (service.decode_pool) never starts work
for a caller that is gone or past its deadline. Over HTTP the bombs get 413 naming ``file`` and the
worker's peak memory (``VmHWM``) does not jump.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest

from core.imageio import ImageTooLargeError, decode_image, inflate_budget
from service.decode_pool import DecodePool
from service.errors import RequestTimeoutError
from tests.support.decode_bombs import deflated_dicom, deflated_dicom_bomb, gzip_nifti_bomb

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
DEFAULT_PIXELS, DEFAULT_BYTES = 40_000_000, 20 * MIB  # service.settings defaults
PEAK_GROWTH_LIMIT_MIB = 200


# ---------------------------------------------------------------------------------------- the budget itself


def test_inflate_budget_at_the_service_defaults():
    assert inflate_budget(DEFAULT_PIXELS, DEFAULT_BYTES) == 8 * 40_000_000 + 20 * MIB == 340_971_520
    assert inflate_budget(None, DEFAULT_BYTES) is None  # no pixel limit, no budget (trusted files)


# ------------------------------------------------------------------ bombs, decoded in a fresh child process

_CHILD = """
import json, resource, sys, time
sys.path[:0] = [{repo!r}]
from tests.support import decode_bombs
from core.imageio import ImageDecodeError, decode_image
data = getattr(decode_bombs, {builder!r})(*{args!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cpu = time.process_time()
try:
    decoded = decode_image(data, max_pixels={pixels}, max_bytes={max_bytes})
    outcome, message = "decoded", str(decoded.shape)
except ImageDecodeError as exc:
    outcome, message = type(exc).__name__, str(exc)
print(json.dumps({{"outcome": outcome, "message": message, "upload_bytes": len(data),
                  "cpu_s": time.process_time() - cpu,
                  "peak_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}}))
"""


def _decode_in_child(builder: str, *args: int) -> dict:
    """Decode a bomb at the service's default limits in a new interpreter; its outcome and peak memory."""
    code = _CHILD.format(repo=str(REPO_ROOT), builder=builder, args=args,
                         pixels=DEFAULT_PIXELS, max_bytes=DEFAULT_BYTES)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("rows", "columns"), [(512, 512), (6000, 6000)])
def test_deflated_dicom_bomb_is_refused_without_inflating_it(rows, columns):
    # ~1 MiB upload, 1 GiB of zeros in PixelData; a 6000 x 6000 plane is within max_pixels.
    result = _decode_in_child("deflated_dicom_bomb", rows, columns, 1024)
    assert result["upload_bytes"] < 2 * MIB
    assert result["outcome"] == "ImageTooLargeError", result
    assert "deflated DICOM inflates to more than" in result["message"]
    assert "over the limit of" in result["message"]  # the REST layer answers 413 for this
    assert result["peak_growth_mib"] < PEAK_GROWTH_LIMIT_MIB, result
    assert result["cpu_s"] < 30, result  # generous: it inflates at most the declared pixels + 20 MiB


def test_gzip_nifti_bomb_is_refused_from_its_header():
    # ~4 MiB upload declaring 2000 x 2000 x 1000 uint8: the middle slice ends 2 GB into the stream.
    result = _decode_in_child("gzip_nifti_bomb", 2000, 2000, 1000)
    assert result["upload_bytes"] < 5 * MIB
    assert result["outcome"] == "ImageTooLargeError", result
    assert "NIfTI slice 500 of 2000x2000x1000 uint8 voxels ends 2004000352 bytes" in result["message"]
    assert "over the limit of 340971520 inflated bytes" in result["message"]
    assert result["peak_growth_mib"] < PEAK_GROWTH_LIMIT_MIB, result
    assert result["cpu_s"] < 30, result


def test_deflated_dicom_plane_over_max_pixels_is_refused_from_the_inflated_head():
    # The header is read from the first inflated MiB: the 7000 x 7000 plane is refused there.
    with pytest.raises(ImageTooLargeError, match=r"DICOM of 7000x7000 = 49000000 pixels is over the limit"):
        decode_image(deflated_dicom_bomb(7000, 7000, 64), max_pixels=DEFAULT_PIXELS, max_bytes=DEFAULT_BYTES)


def test_deflated_dicom_with_bad_bits_allocated_is_refused_from_the_header():
    data = deflated_dicom(np.zeros((8, 8), np.uint16))
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.BitsAllocated = 12
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(ValueError, match="BitsAllocated 12 is not one of 1, 8, 16, 32, 64"):
        decode_image(buffer.getvalue(), max_pixels=DEFAULT_PIXELS)


def test_a_bomb_is_refused_even_when_the_header_is_past_the_first_mib():
    # A 2 MiB private element before Rows and Columns: only the budget applies, and it holds.
    data = deflated_dicom_bomb(16, 16, 400, private_mib=2)
    refusal = "inflates to more than 9020000 bytes, over the limit of 9020000 bytes"
    with pytest.raises(ImageTooLargeError, match=refusal):
        decode_image(data, max_pixels=1_000_000, max_bytes=1_020_000)  # budget 8 * 1e6 + 1.02e6 bytes


# -------------------------------------------------------------------------------- honest files still decode


def test_honest_deflated_dicom_decodes_as_the_uncompressed_one():
    pixels = (np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 7) % 4096
    decoded = decode_image(deflated_dicom(pixels), max_pixels=DEFAULT_PIXELS, max_bytes=DEFAULT_BYTES)
    assert decoded.format == "dicom" and decoded.shape == (64, 80)
    expected = (pixels - pixels.min()) / (pixels.max() - pixels.min())  # no window: min-max
    np.testing.assert_allclose(decoded.pixels, expected, atol=1e-6)
    assert str(decoded.source.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.1.99"


def test_gzip_nifti_reads_only_up_to_the_slice_it_needs():
    # Budget 8 * 10_000 + 20_000 = 100_000 bytes: slice 2 ends at 352 + 3 * 10_000, the middle (25) does not.
    rows, columns, slices = np.ogrid[:100, :100, :50]
    volume = ((rows + 2 * columns + 3 * slices) % 17 * 15).astype(np.uint8)  # compresses to a few KB
    packed = gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes())
    assert len(packed) < 20_000
    decoded = decode_image(packed, max_pixels=10_000, max_bytes=20_000, slice_index=2)
    plane = volume[:, :, 2].astype(np.float64)
    np.testing.assert_allclose(decoded.pixels, (plane - plane.min()) / (plane.max() - plane.min()), atol=1e-6)
    with pytest.raises(ImageTooLargeError, match="NIfTI slice 25 of 100x100x50 uint8 voxels ends 260352"):
        decode_image(packed, max_pixels=10_000, max_bytes=20_000)
    assert decode_image(packed, max_pixels=10_000, max_bytes=None).shape == (100, 100)  # 64 MiB headroom


def test_gzip_nifti_with_scaling_and_several_members_decodes_like_nibabel():
    volume = np.random.default_rng(4).integers(-500, 500, (12, 10, 6)).astype(np.int16)
    image = nib.Nifti1Image(volume, np.eye(4))
    image.header.set_slope_inter(0.5, -3.0)
    raw = image.to_bytes()
    two_members = gzip.compress(raw[:700]) + gzip.compress(raw[700:])  # gzip reads members one by one
    expected = np.asarray(nib.Nifti1Image.from_bytes(raw).dataobj[:, :, 4], np.float64)
    decoded = decode_image(two_members, slice_index=4, max_pixels=DEFAULT_PIXELS)
    np.testing.assert_allclose(decoded.pixels, (expected - expected.min()) / np.ptp(expected), atol=1e-6)
    with pytest.raises(ValueError, match="truncated or corrupt NIfTI data"):
        decode_image(two_members[:-200], slice_index=5)


# ------------------------------------------------------------------------------------------ the decode pool


def test_decode_pool_runs_jobs_on_its_own_bounded_threads():
    pool = DecodePool(threads=2)
    names: list[str] = []
    try:
        async def main() -> None:
            def job() -> None:
                time.sleep(0.02)
                names.append(threading.current_thread().name)

            await asyncio.gather(*(pool.run(job) for _ in range(8)))

        asyncio.run(main())
    finally:
        pool.shutdown()
    assert len(names) == 8
    assert all(name.startswith("medrefine-decode") for name in names), names
    assert len(set(names)) <= 2, names


def test_decode_pool_never_starts_work_for_a_gone_caller_or_a_passed_deadline():
    pool = DecodePool(threads=1)
    release = threading.Event()
    started: list[str] = []

    def blocker() -> str:
        release.wait(60)
        return "blocker"

    def job(label: str):
        def run() -> str:
            started.append(label)
            return label
        return run

    async def main() -> tuple:
        busy = asyncio.ensure_future(pool.run(blocker))
        gone = asyncio.ensure_future(pool.run(job("gone")))  # its client hangs up while it waits
        late = asyncio.ensure_future(pool.run(job("late"), deadline=time.monotonic() + 0.05))
        fine = asyncio.ensure_future(pool.run(job("fine"), deadline=time.monotonic() + 120))
        await asyncio.sleep(0.2)  # the deadline of "late" passes while the one thread is busy
        gone.cancel()
        await asyncio.wait([gone])  # the client left well before a thread came free
        release.set()
        return await asyncio.gather(busy, gone, late, fine, return_exceptions=True)

    try:
        busy, gone, late, fine = asyncio.run(main())
    finally:
        release.set()
        pool.shutdown()
    assert busy == "blocker" and fine == "fine"
    assert isinstance(gone, asyncio.CancelledError)
    assert isinstance(late, RequestTimeoutError) and late.code == 504 and "request_timeout_s" in late.message
    assert started == ["fine"]


# ------------------------------------------------------------------------------------------------ over HTTP


def _worker_peak_rss_mib(server) -> dict[int, float]:
    """Peak RSS (``VmHWM``) of the server's processes, by pid."""
    import psutil

    root = psutil.Process(server.process.pid)
    peaks = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks[process.pid] = int(line.split()[1]) / 1024
    return peaks


@pytest.mark.parametrize("bomb", ["dicom", "nifti"])
def test_bomb_upload_gets_413_naming_file_and_the_worker_does_not_balloon(live_server, bomb):
    data = deflated_dicom_bomb() if bomb == "dicom" else gzip_nifti_bomb(2000, 2000, 1000)
    name = "bomb.dcm" if bomb == "dicom" else "bomb.nii.gz"
    before = _worker_peak_rss_mib(live_server)
    with live_server.client(timeout=120) as client:
        response = client.post("/segment", files={"file": (name, data, "application/octet-stream")})
    after = _worker_peak_rss_mib(live_server)
    assert response.status_code == 413, response.text
    body = response.json()
    assert body["field"] == "file" and "over the limit" in body["error"], body
    growth = {pid: after[pid] - before[pid] for pid in after if pid in before}
    assert growth and max(growth.values()) < PEAK_GROWTH_LIMIT_MIB, growth


def test_eight_bombs_at_once_are_refused_and_a_good_upload_beside_them_is_served(live_server):
    from core.imageio import encode_png
    from core.phantoms import breast_ultrasound

    bomb = gzip_nifti_bomb(2000, 2000, 1000)
    good, _ = breast_ultrasound(7, size=128)
    good_png = encode_png(good)

    async def main() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=live_server.url, headers=live_server.headers(), timeout=120,
                                     limits=limits) as client:
            bombs = [client.post("/segment", files={"file": ("b.nii.gz", bomb, "application/gzip")})
                     for _ in range(8)]
            fine = client.post("/segment", files={"file": ("ok.png", good_png, "image/png")})
            return await asyncio.gather(*bombs, fine)

    *refused, served = asyncio.run(main())
    assert [r.status_code for r in refused] == [413] * 8, [r.text for r in refused]
    assert all(r.json()["field"] == "file" for r in refused)
    assert served.status_code == 200, served.text
    assert served.json()["shape"] == [128, 128]
