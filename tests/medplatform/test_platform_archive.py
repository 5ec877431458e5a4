"""medplatform.archive: a good ZIP extracts; every hostile archive is refused with the entry named, and
nothing is written outside the extraction directory (the directory itself is removed)."""

from __future__ import annotations

import io
import stat
import struct
import warnings
import zipfile
from pathlib import Path

import pytest

from medplatform.archive import ARCHIVE, ArchiveRefused, entry_parts, safe_extract
from medplatform.dataset_limits import DatasetLimits
from medplatform.errors import InvalidValue
from tests.support.platform_fixtures import folder_members, phantom_folder, zip_bytes

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64  # content is not decoded here; only the archive is checked


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return buffer.getvalue()


def _duplicate(name: str) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate it is asked to write
        return _zip([(name, PNG), (name, PNG)])


def _symlink(name: str, target: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: external_attr's high 16 bits are st_mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return _zip([(info, target.encode())])


def _with_flag_bit(data: bytes, bit: int) -> bytes:
    """Set a general-purpose flag bit in every local and central header (zipfile cannot write encryption)."""
    patched = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = patched.find(signature)
        while start >= 0:
            flags = struct.unpack_from("<H", patched, start + offset)[0]
            struct.pack_into("<H", patched, start + offset, flags | bit)
            start = patched.find(signature, start + 4)
    return bytes(patched)


def _lying_sizes(data: bytes, declared: int) -> bytes:
    """Rewrite the one entry's uncompressed size in both headers: the header claims ``declared`` bytes."""
    patched = bytearray(data)
    struct.pack_into("<I", patched, patched.find(b"PK\x01\x02") + 24, declared)
    struct.pack_into("<I", patched, patched.find(b"PK\x03\x04") + 22, declared)
    return bytes(patched)


SMALL = DatasetLimits(max_files=10, max_bytes=1 << 20, max_file_bytes=1 << 20)

# (case id, archive bytes, limits, the entry the refusal must name, a word of the reason)
HOSTILE = [
    ("zip-slip", _zip([("images/a.png", PNG), ("../evil.png", PNG)]), None, "../evil.png", "traversal"),
    ("zip-slip-inner", _zip([("images/../../evil.png", PNG)]), None, "images/../../evil.png", "traversal"),
    ("absolute", _zip([("/tmp/evil.png", PNG)]), None, "/tmp/evil.png", "absolute"),
    ("drive-letter", _zip([("C:/evil.png", PNG)]), None, "C:/evil.png", "absolute"),
    ("backslash", _zip([("..\\evil.png", PNG)]), None, "..\\evil.png", "backslash"),
    ("symlink", _symlink("images/link.png", "../../../../etc/passwd"), None, "images/link.png", "symbolic link"),
    ("too-many", _zip([(f"images/{i}.png", PNG) for i in range(11)]), SMALL, ARCHIVE, "entries"),
    ("too-large-total", _zip([(f"images/{i}.png", b"\1" * 400_000) for i in range(3)]), SMALL,
     "images/2.png", "uncompressed"),
    ("zip-bomb-ratio", _zip([("images/bomb.png", b"\0" * (4 << 20))]), DatasetLimits(), "images/bomb.png",
     "ratio"),
    ("lying-header", _lying_sizes(_zip([("images/liar.png", b"\0" * (2 << 20))]), 100), None,
     "images/liar.png", "corrupt"),
    ("nested-by-name", _zip([("images/inner.zip", b"not even a zip")]), None, "images/inner.zip", "nested"),
    ("nested-tar-gz", _zip([("masks/inner.tar.gz", b"x")]), None, "masks/inner.tar.gz", "nested"),
    ("nested-by-content", _zip([("images/a.png", _zip([("x.png", PNG)]))]), None, "images/a.png", "nested"),
    ("encrypted", _with_flag_bit(_zip([("images/a.png", PNG)]), 0x1), None, "images/a.png", "encrypted"),
    ("duplicate", _duplicate("images/a.png"), None, "images/a.png", "two entries"),
    ("not-a-zip", b"this is not an archive at all" * 10, None, ARCHIVE, "not a readable ZIP"),
]


@pytest.mark.parametrize("case, data, limits, entry, reason", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_archive_is_refused_naming_the_entry_and_nothing_escapes(tmp_path, case, data, limits, entry,
                                                                            reason):
    jail = tmp_path / "jail" / "inner"  # '..' from the extraction dir lands in jail/, then tmp_path
    dest = jail / "extract"
    jail.mkdir(parents=True)
    archive = tmp_path / "upload.zip"
    archive.write_bytes(data)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(ArchiveRefused) as refused:
        safe_extract(archive, dest, limits or DatasetLimits())
    assert refused.value.entry == entry
    assert reason in refused.value.reason
    assert refused.value.field == "file" and repr(entry) in str(refused.value)
    assert isinstance(refused.value, InvalidValue)  # the HTTP layer answers 400 with the field
    assert not dest.exists(), "the extraction directory is removed on refusal"
    after = sorted(p for p in tmp_path.rglob("*"))
    assert after == before, f"files appeared: {set(after) - set(before)}"
    assert not list(Path("/tmp").glob("evil.png"))


def test_good_archive_extracts_every_file_and_skips_os_litter(tmp_path):
    members = folder_members(phantom_folder(tmp_path / "src", n=4, size=32))
    data = zip_bytes({**members, "__MACOSX/images/._0000.png": b"apple", "images/.DS_Store": b"x"},
                     prefix="data/")
    written = safe_extract(data, tmp_path / "out", DatasetLimits())
    assert written == sorted(f"data/{name}" for name in members)
    for name, content in members.items():
        assert (tmp_path / "out" / "data" / name).read_bytes() == content
    assert not (tmp_path / "out" / "__MACOSX").exists()


def test_small_compressible_entries_are_not_held_to_the_ratio(tmp_path):
    """An all-zero mask compresses ~100:1 but is tiny; only entries above ratio_min_bytes count as bombs."""
    data = _zip([("masks/empty.tif", b"\0" * 500_000)])
    assert safe_extract(data, tmp_path / "out", DatasetLimits(max_ratio=10)) == ["masks/empty.tif"]


def test_per_file_limit_and_nii_gz_is_not_a_nested_archive(tmp_path):
    import gzip

    nifti = gzip.compress(b"\x5c\x01\x00\x00" + b"\0" * 400)  # gzip content under a .nii.gz name is allowed
    assert safe_extract(_zip([("images/a.nii.gz", nifti)]), tmp_path / "ok", DatasetLimits()) == ["images/a.nii.gz"]
    with pytest.raises(ArchiveRefused) as refused:
        safe_extract(_zip([("images/a.png", b"\1" * 5000)]), tmp_path / "big", DatasetLimits(max_file_bytes=4096))
    assert refused.value.entry == "images/a.png" and "per-file limit" in refused.value.reason


def test_stream_sources_and_a_non_empty_destination(tmp_path):
    data = _zip([("images/a.png", PNG)])

    class Unseekable(io.RawIOBase):
        def __init__(self, payload: bytes) -> None:
            self._inner = io.BytesIO(payload)

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def readinto(self, buffer) -> int:
            chunk = self._inner.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    assert safe_extract(io.BytesIO(data), tmp_path / "seekable") == ["images/a.png"]
    assert safe_extract(Unseekable(data), tmp_path / "spooled") == ["images/a.png"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(InvalidValue):
        safe_extract(data, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["", "/", "a//b.png", "./a.png", "a/./b.png", "a\x00.png", "x" * 300])
def test_entry_names_refused(name):
    with pytest.raises(ArchiveRefused):
        entry_parts(name)


def test_entry_parts_of_ordinary_names():
    assert entry_parts("data/images/0001.png") == ("data", "images", "0001.png")
    assert entry_parts("images/") == ("images",)
