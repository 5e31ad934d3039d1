"""The Serve application: `import_path: cloud_service.app:build` in deploy/serve_config.yaml.

    Ingress ──► VisionTail   (blocks k..L + head, @serve.batch)
        ├────► TextEncoder  (text.onnx + Redis prompt cache)
        └────► Scorer       (template average, softmax, top-k)

`build(args)` takes the application `args` of the config (see cloud_service.settings for keys);
anything not given there comes from `SPLITCLIP_*` variables, then from the defaults.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from cloud_service.ingress import Ingress
from cloud_service.scoring import Scorer
from cloud_service.settings import CloudSettings, SettingsError
from cloud_service.text_encoder import TextEncoder
from cloud_service.vision_tail import MAX_CONCURRENT_BATCHES, VisionTail

APP_NAME = "splitclip"


def build(args: dict[str, Any] | None = None) -> Application:
    settings = CloudSettings.load(args or {})
    if not settings.bundle:
        raise SettingsError("no bundle: set args.bundle in the Serve config or SPLITCLIP_BUNDLE")
    a = settings.as_args()
    # @serve.batch only fills batches if the replica admits max_batch_size x max_concurrent_batches
    # requests at once (a per-deployment value in the Serve config overrides this).
    ongoing = max(64, settings.max_batch_size * MAX_CONCURRENT_BATCHES)
    tail = VisionTail.options(max_ongoing_requests=ongoing).bind(a)
    return Ingress.bind(tail, TextEncoder.bind(a), Scorer.bind(a), a)
