"""docs/api.md cannot drift: every field the endpoints accept (read from service/app.py's signatures), every
key a live server answers with and every OIP tensor the registry declares is named in its section."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from core.imageio import encode_mask_png, encode_png
from core.phantoms import breast_ultrasound

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"
README = API_MD.parent.parent / "README.md"


def _sections() -> dict[str, str]:
    """docs/api.md by heading (``## POST /segment``, ``### Model `segment```) -> that section's text."""
    sections: dict[str, str] = {}
    heading = ""
    for line in API_MD.read_text(encoding="utf-8").splitlines():
        if line.startswith(("## ", "### ")):
            heading = line.lstrip("#").strip()
            sections[heading] = ""
        elif heading:
            sections[heading] += line + "\n"
    return sections


def _missing(names, text: str) -> list[str]:
    return sorted(name for name in names if f"`{name}`" not in text)


def test_readme_links_the_reference():
    assert "(docs/api.md)" in README.read_text(encoding="utf-8")


def test_every_request_field_of_every_endpoint_is_documented():
    from service.app import MedRefine

    sections = _sections()
    routes = {api.route for api in MedRefine.apis.values()}
    assert routes == {"/segment", "/refine", "/generate", "/synthesize"}
    for api in MedRefine.apis.values():
        section = sections.get(f"POST {api.route}")
        assert section is not None, f"docs/api.md has no '## POST {api.route}' section"
        fields = list(api.input_spec.model_fields)
        assert fields and _missing(fields, section) == [], (api.route, _missing(fields, section))


def test_every_rest_output_and_oip_tensor_is_documented():
    from service.oip_models import GenerateModel, SegmentModel, SynthesizeModel, default_registry
    from service.rest import REST_OUTPUTS

    sections = _sections()
    assert _missing([f"{name}_png_base64" for name in REST_OUTPUTS], sections["POST /segment"]) == []
    assert _missing(REST_OUTPUTS, sections["POST /segment"]) == []  # the `outputs` choices
    models = [SegmentModel(), GenerateModel(), SynthesizeModel()]
    assert default_registry().names == tuple(model.name for model in models)  # a new model needs its section
    for model in models:
        section = sections[f"Model `{model.name}`"]
        tensors = [spec.name for spec in (*model.inputs, *model.outputs)]
        assert _missing(tensors, section) == [], (model.name, _missing(tensors, section))
        assert _missing([p.name for p in model.parameters], section) == []
    # The segment IMAGE shape that model metadata reports is the one the reference names.
    image_row = next(line for line in sections["Model `segment`"].splitlines() if line.startswith("| `IMAGE`"))
    assert f"metadata: `{list(SegmentModel.inputs[0].shape)}`" in image_row


def test_every_response_key_of_a_live_server_is_documented(live_server):
    sections = _sections()
    image, _ = breast_ultrasound(3, size=96)
    png = encode_png(image)
    with live_server.client(timeout=120) as client:
        segment = client.post("/segment", files={"file": ("p.png", png, "image/png")},
                              data={"outputs": "image,mask,coarse_mask,probability,coarse_probability,gate"})
        assert segment.status_code == 200, segment.text
        body = segment.json()
        assert _missing(body, sections["POST /segment"]) == []
        assert _missing(body["model"], sections["POST /segment"]) == []
        mask = np.array(Image.open(io.BytesIO(base64.b64decode(body["mask_png_base64"]))))
        assert set(np.unique(mask)) <= {0, 255}  # REST masks are 0/255, as the reference says

        refine = client.post("/refine", files={"file": ("p.png", png, "image/png")},
                             data={"box": json.dumps([20, 20, 70, 70]), "points": "[[45, 45]]",
                                   "point_labels": "[1]", "outputs": "image,mask,probability"})
        assert refine.status_code == 200, refine.text
        assert _missing(refine.json(), sections["POST /refine"]) == []

        generate = client.post("/generate", json={"prompt": "breast ultrasound, lesion",
                                                  "modality": _a_modality(client), "steps": 2, "seed": 1})
        assert generate.status_code == 200, generate.text
        assert _missing(generate.json(), sections["POST /generate"]) == []

        blob = np.zeros((32, 32), np.uint8)
        blob[8:20, 10:24] = 1
        synthesize = client.post("/synthesize", files={"file": ("m.png", encode_mask_png(blob), "image/png")})
        assert synthesize.status_code == 200, synthesize.text
        assert _missing(synthesize.json(), sections["POST /synthesize"]) == []

        meta = client.get("/v2/models/segment").json()
        assert meta["inputs"][0]["shape"] == [-1, -1, 3]  # what docs/api.md says metadata reports


def _a_modality(client: httpx.Client) -> str:
    ready = client.get("/readyz").json()
    assert ready["generation"]["modalities"], ready
    return ready["generation"]["modalities"][0]
