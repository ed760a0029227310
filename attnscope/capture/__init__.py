"""From hooks to the store: ``capture()`` a generation, or install a :class:`Recorder` next to other clients.

>>> import attnscope as ats
>>> ats.capture is capture, ats.Recorder is Recorder
(True, True)
"""

from ._adapters import LORA_SOURCES, adapter_state
from ._capture import capture, check_images_per_prompt, check_num_steps, check_scale, check_size
from ._recorder import Recorder

__all__ = ["LORA_SOURCES", "Recorder", "adapter_state", "capture", "check_images_per_prompt", "check_num_steps", "check_scale", "check_size"]
