"""LoRA interop: diffusers/PEFT and kohya safetensors files in and out (see ``lora_files``)."""

from metalora.export.lora_files import (
    ADAPTER_CONFIG_NAME,
    DIFFUSERS_WEIGHT_NAME,
    LoRAFileError,
    LoRAPair,
    export_diffusers,
    export_kohya,
    import_lora,
    kohya_name,
    read_lora_file,
    two_factor,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "DIFFUSERS_WEIGHT_NAME",
    "LoRAFileError",
    "LoRAPair",
    "export_diffusers",
    "export_kohya",
    "import_lora",
    "kohya_name",
    "read_lora_file",
    "two_factor",
]
