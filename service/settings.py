"""Service settings: one frozen dataclass read from ``MEDREFINE_*`` environment variables or the CLI."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

__all__ = ["BACKENDS", "ENV_PREFIX", "PRECISIONS", "ServiceSettings", "SettingsError", "add_cli_arguments"]

ENV_PREFIX = "MEDREFINE_"
BACKENDS = ("onnxruntime", "openvino", "torch", "tensorrt")
# auto: the backend's own (the artifacts' precision; openvino: bf16 where the CPU has it); fp32 / bf16: openvino only
PRECISIONS = ("auto", "fp32", "bf16")
MIB = 1024 * 1024


class SettingsError(ValueError):
    """A setting has a value outside its documented range; the message names the variable or flag."""


@dataclass(frozen=True)
class ServiceSettings:
    """Everything a server process needs to start; immutable once built.

    Byte sizes are bytes, times are milliseconds (``*_ms``) or seconds (``*_s``). ``api_key`` is None
    when authentication is off; it is never printed (see :meth:`public_dict`).
    """

    artifacts: Path = Path("artifacts/default")
    backend: str = "onnxruntime"
    device: str = "auto"
    precision: str = "auto"
    host: str = "127.0.0.1"
    port: int = 3000
    grpc_port: int = 8001
    max_upload_bytes: int = 20 * MIB
    max_pixels: int = 40_000_000
    max_points: int = 16
    # 8, not 16: an engine call of 8 ends twice as soon, so a burst's latecomers wait less; 3-4 % of the peak
    # for a lower tail (loadtest/results/max-batch-ab-openvino-*.json).
    max_batch_size: int = 8
    max_latency_ms: float = 10.0
    inference_lanes: int = 1  # segmentation batches run at once, one worker thread each
    max_queue: int = 64
    request_timeout_s: float = 30.0
    max_concurrency: int = 128
    max_receiving: int = 512
    upload_grace_s: float = 10.0
    min_upload_bytes_per_s: float = 16384.0
    keepalive_timeout_s: int = 75
    drain_timeout_s: float = 25.0
    api_key_env: str = "MEDREFINE_API_KEY"
    api_key: str | None = None
    require_api_key: bool = False
    anonymize_dicom: bool = True
    embedding_cache_bytes: int = 256 * MIB
    intra_op_threads: int = 0
    generators: str = "auto"
    synthesizer: str = "auto"  # what /synthesize serves: medplatform.synthesizer.choose_synthesizer
    generation_max_images: int = 16
    generation_max_steps: int = 100
    generation_max_queue: int = 32
    # The platform (service.platform_api): a key of its own for mutating calls, and where jobs run.
    admin_key: str | None = field(default=None, repr=False)
    platform_workers: int = 1
    ray_address: str = ""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise SettingsError(f"{ENV_PREFIX}BACKEND: expected one of {BACKENDS}, got {self.backend!r}")
        if not (self.device in ("auto", "cpu", "cuda", "tensorrt") or
                (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise SettingsError(
                f"{ENV_PREFIX}DEVICE: expected auto, cpu, cuda, cuda:N or tensorrt, got {self.device!r}"
            )
        if self.precision not in PRECISIONS:
            raise SettingsError(f"{ENV_PREFIX}PRECISION: expected one of {PRECISIONS}, got {self.precision!r}")
        if self.precision != "auto" and self.backend != "openvino":
            raise SettingsError(f"{ENV_PREFIX}PRECISION: {self.precision!r} chooses the openvino backend's inference "
                                f"precision; backend {self.backend!r} runs the artifacts' own (set auto)")
        if self.backend == "openvino" and self.device not in ("auto", "cpu"):
            raise SettingsError(f"{ENV_PREFIX}DEVICE: the openvino backend runs on the CPU (auto or cpu), "
                                f"got {self.device!r}")
        for name in ("port", "grpc_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise SettingsError(f"{_env_name(name)}: expected a port in [0, 65535], got {value}")
        positive = ("max_upload_bytes", "max_pixels", "max_points", "max_batch_size", "inference_lanes", "max_queue",
                    "request_timeout_s", "max_concurrency", "max_receiving", "keepalive_timeout_s",
                    "generation_max_images", "generation_max_steps",
                    "generation_max_queue")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{_env_name(name)}: expected a value > 0, got {getattr(self, name)}")
        for name in ("max_latency_ms", "drain_timeout_s", "embedding_cache_bytes", "intra_op_threads",
                     "upload_grace_s", "min_upload_bytes_per_s"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{_env_name(name)}: expected a value >= 0, got {getattr(self, name)}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise SettingsError(f"{self.api_key_env}: the API key must be at least 8 characters")
        if self.admin_key is not None and len(self.admin_key) < 8:
            raise SettingsError(f"{ENV_PREFIX}ADMIN_KEY: the admin key must be at least 8 characters")
        if self.admin_key is not None and self.admin_key == self.api_key:
            raise SettingsError(f"{ENV_PREFIX}ADMIN_KEY: must differ from the API key ({self.api_key_env}); "
                                "a shared key would let every inference client train and delete")
        if not 0 <= self.platform_workers <= 64:
            raise SettingsError(f"{ENV_PREFIX}PLATFORM_WORKERS: expected 0..64, got {self.platform_workers}")
        if self.require_api_key and self.api_key is None:
            raise SettingsError(
                f"{ENV_PREFIX}REQUIRE_API_KEY is on but {self.api_key_env} is unset: set the key "
                f"(at least 8 characters) or turn {ENV_PREFIX}REQUIRE_API_KEY off"
            )

    @property
    def longest_request_s(self) -> int:
        """Seconds the slowest acceptable request may take from its first byte: the slowest allowed upload of
        ``max_upload_bytes``, then ``request_timeout_s`` and a margin (a day when uploads have no minimum rate)."""
        if self.min_upload_bytes_per_s <= 0:
            return 86_400
        upload_s = self.upload_grace_s + self.max_upload_bytes / self.min_upload_bytes_per_s
        return int(upload_s + self.request_timeout_s + 60)

    @property
    def generators_dir(self) -> Path | None:
        """The generator artifact directory to load, or None when generation is off.

        ``auto`` resolves to ``artifacts/generators`` next to ``artifacts`` only if it exists, so a server
        without exported generators still serves segmentation; an explicit path must load.
        """
        value = self.generators.strip()
        if value.lower() in ("", "off", "none", "0"):
            return None
        if value.lower() == "auto":
            candidate = Path(self.artifacts).parent / "generators"
            return candidate if (candidate / "manifest.json").is_file() else None
        return Path(value).expanduser()

    # -- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServiceSettings:
        """Settings from ``MEDREFINE_*`` variables (defaults where unset), then keyword overrides.

        Raises:
            SettingsError: naming the variable whose value does not parse or is out of range.
        """
        env = os.environ if environ is None else environ
        kinds = get_type_hints(cls)
        values: dict[str, Any] = {}
        for item in fields(cls):
            if item.name == "api_key":
                continue
            raw = env.get(_env_name(item.name))
            if raw is None or raw == "":
                continue
            values[item.name] = _parse(item.name, kinds[item.name], raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        key_env = str(values.get("api_key_env", cls.api_key_env))
        if "api_key" not in values:
            key = env.get(key_env)
            values["api_key"] = key if key else None
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        """Settings from parsed CLI flags (see :func:`add_cli_arguments`) over the environment."""
        overrides = {
            "port": args.port,
            "grpc_port": args.grpc_port,
            "backend": args.backend,
            "precision": args.precision,
            "artifacts": Path(args.artifacts) if args.artifacts is not None else None,
            "host": args.host,
            "api_key_env": args.api_key_env,
            "generators": args.generators,
            "synthesizer": args.synthesizer,
        }
        return cls.from_env(environ, **overrides)

    def to_env(self) -> dict[str, str]:
        """The ``MEDREFINE_*`` variables that rebuild these settings in another process.

        The API key itself is exported under ``api_key_env`` only when set.
        """
        env: dict[str, str] = {}
        for item in fields(self):
            if item.name in ("api_key", "admin_key"):
                continue
            env[_env_name(item.name)] = str(getattr(self, item.name))
        if self.admin_key is not None:
            env[_env_name("admin_key")] = self.admin_key
        if self.api_key is not None:
            env[self.api_key_env] = self.api_key
        return env

    def public_dict(self) -> dict[str, Any]:
        """A JSON-ready view for logs and diagnostics: the API key is reduced to on/off."""
        data = asdict(self)
        data["artifacts"] = str(self.artifacts)
        data["api_key"] = "set" if self.api_key else None
        data["admin_key"] = "set" if self.admin_key else None
        return data


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The handful of flags ``python -m service`` takes; every other limit is an environment variable."""
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default 3000, MEDREFINE_PORT)")
    parser.add_argument("--grpc-port", type=int, default=None,
                        help="gRPC port (default 8001, MEDREFINE_GRPC_PORT; 0 turns gRPC off)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="inference engine (default onnxruntime, MEDREFINE_BACKEND)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="openvino inference precision: fp32, bf16 (on CPUs with AMX / AVX512-BF16) or auto "
                             "(default: bf16 where supported; MEDREFINE_PRECISION)")
    parser.add_argument("--artifacts", default=None,
                        help="exported artifact directory (default artifacts/default, MEDREFINE_ARTIFACTS)")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1, MEDREFINE_HOST)")
    parser.add_argument("--generators", default=None,
                        help="generator artifact directory, 'auto' (default: artifacts/generators beside "
                             "--artifacts when present) or 'off' (MEDREFINE_GENERATORS)")
    parser.add_argument("--synthesizer", default=None,
                        help="generator /synthesize serves: a generator artifact directory (python -m export genseg), "
                             "a registry version name[:VERSION|@ALIAS], 'auto' (default: synthesizer@production "
                             "when registered, else the stage-one pix2pix) or 'off' (MEDREFINE_SYNTHESIZER)")
    parser.add_argument("--api-key-env", default=None,
                        help="name of the environment variable holding the API key (default MEDREFINE_API_KEY); "
                             "auth is off when that variable is unset")


def _env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _parse(name: str, kind: Any, raw: str) -> Any:
    """``raw`` (an environment value) as the field's type ``kind``; SettingsError naming the variable."""
    if kind is int or kind is float:
        try:
            return kind(raw)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise SettingsError(f"{_env_name(name)}: expected {expected}, got {raw!r}") from None
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
            raise SettingsError(f"{_env_name(name)}: expected 0/1 (or true/false), got {raw!r}")
        return lowered in ("1", "true", "yes", "on")
    if kind is Path:
        return Path(raw)
    return raw  # str and str | None


def parse_cli(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``python -m service`` flags."""
    parser = argparse.ArgumentParser(
        prog="python -m service", description="Serve medrefine over HTTP (REST, /v2, /ui, /metrics) and gRPC.",
        epilog="Every other limit is a MEDREFINE_* environment variable (see service/settings.py).")
    add_cli_arguments(parser)
    return parser.parse_args(argv)
