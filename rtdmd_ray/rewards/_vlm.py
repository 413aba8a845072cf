"""Loading Qwen-VL processors on a stack without torchvision (our CPU stack).

transformers 5 checks a processor's ``video_processor`` against ``BaseVideoProcessor``, which only exists when
torchvision is installed, so ``AutoProcessor.from_pretrained`` fails for Qwen-VL models here. The fallback
builds the same processor class from its tokenizer, the PIL-backend image processor and the chat template,
with no video processor (the rewards never send video). On GPU machines with torchvision the normal
``AutoProcessor`` path is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _without_video_check(proc_cls: type) -> type:
    class _Processor(proc_cls):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    _Processor.__name__ = _Processor.__qualname__ = proc_cls.__name__
    return _Processor


def build_processor(
    proc_cls: type, *, image_processor: Any, tokenizer: Any, chat_template: str | None
) -> Any:
    """``proc_cls(image_processor, tokenizer, video_processor=None, chat_template)`` without torchvision."""
    return _without_video_check(proc_cls)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=chat_template,
    )


def load_vlm_processor(source: str) -> Any:
    """``AutoProcessor.from_pretrained(source)``, or the torchvision-free rebuild of the same processor."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(source)
    except (AttributeError, ValueError, ImportError, TypeError):
        pass
    cfg: dict[str, Any] = {}
    local = Path(source)
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (local / name).is_file():
            cfg = {**json.loads((local / name).read_text()), **cfg}
    if not local.is_dir():
        from huggingface_hub import hf_hub_download

        cfg = json.loads(Path(hf_hub_download(source, "preprocessor_config.json")).read_text())
    proc_name = cfg.get("processor_class") or "AutoProcessor"
    proc_cls = getattr(transformers, proc_name)
    tokenizer = AutoTokenizer.from_pretrained(source)
    image_processor = AutoImageProcessor.from_pretrained(source)
    template = getattr(tokenizer, "chat_template", None)
    for name in ("chat_template.jinja", "chat_template.json"):
        if template is None and (local / name).is_file():
            text = (local / name).read_text()
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
    return build_processor(
        proc_cls, image_processor=image_processor, tokenizer=tokenizer, chat_template=template
    )
