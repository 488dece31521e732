"""How the base model is loaded for a forward pass: device placement and bitsandbytes quantization."""
from __future__ import annotations

import re

from moeforge.errors import ConfigError

_DEVICE = re.compile(r"^(cpu|auto|cuda|cuda:\d+)$")
QUANT_HINT = "pip install moeforge[quant]"


def check_device(device: str) -> None:
    if not _DEVICE.match(str(device)):
        raise ConfigError(f"--device: {device!r} is not one of cpu, cuda, cuda:N, auto")


def check_load_options(options) -> None:
    """Reject bad --device / --load-in-* values before anything is read or written."""
    check_device(options.device)
    if options.load_in_4bit and options.load_in_8bit:
        raise ConfigError("--load-in-4bit and --load-in-8bit: choose one")
    if options.load_in_4bit or options.load_in_8bit:
        flag = "--load-in-4bit" if options.load_in_4bit else "--load-in-8bit"
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"{flag} needs bitsandbytes: {QUANT_HINT}") from None


def device_map(device: str):
    """`auto` spreads the model over every GPU and then the CPU (accelerate); without GPUs it is the CPU."""
    import torch

    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device: {device} requested but no CUDA device is available")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device: {device} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def load_kwargs(options) -> dict:
    """Keyword arguments of `from_pretrained` for the options' device, dtype and quantization."""
    import torch

    check_load_options(options)
    dtype = getattr(torch, options.hidden_dtype)
    placement = device_map(options.device)
    kwargs = {"dtype": dtype, "device_map": placement, "trust_remote_code": options.trust_remote_code}
    if options.load_in_4bit or options.load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=options.load_in_4bit,
            load_in_8bit=options.load_in_8bit,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_enable_fp32_cpu_offload=placement == "auto",  # layers that spill to the CPU stay unquantized
        )
    return kwargs
