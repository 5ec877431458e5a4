"""The naive baseline: research-style serving of the torch checkpoint, one request at a time."""

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Sequence

__all__ = ["build_app", "main"]


def build_app(model_dir: str, *, threads: int | None = None):
    """A Starlette app serving the run directory ``model_dir`` (``"default"`` = checkpoints/default)."""
    import numpy as np
    import torch
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from core.imageio import ImageDecodeError, decode_image, encode_mask_png
    from weights.checkpoints import build_model_from_run, load_run, resolve_run_dir

    if threads:
        torch.set_num_threads(int(threads))
    info = load_run(resolve_run_dir(model_dir))
    model = build_model_from_run(info)
    threshold = float(info.threshold)

    async def segment(request: Request) -> JSONResponse:
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            return JSONResponse({"error": "multipart field 'file' (an image file) is required"}, status_code=400)
        try:
            pixels = decode_image(await upload.read(), name=upload.filename or "upload").pixels
        except ImageDecodeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        with torch.no_grad():  # blocking on purpose: one request at a time, like the research code
            image = torch.from_numpy(np.ascontiguousarray(pixels))[None, None]
            refined = model(image)["refined_mask"][0, 0].numpy()
        mask = (refined >= threshold).astype(np.uint8)
        return JSONResponse({
            "mask_png_base64": base64.b64encode(encode_mask_png(mask)).decode("ascii"),
            "height": int(mask.shape[0]),
            "width": int(mask.shape[1]),
            "foreground_fraction": float(mask.mean()),
            "threshold": threshold,
        })

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "threads": torch.get_num_threads()})

    return Starlette(routes=[Route("/segment", segment, methods=["POST"]), Route("/healthz", healthz)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.naive_server", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="run directory (default: checkpoints/default)")
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    import uvicorn

    app = build_app(args.model, threads=args.threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
