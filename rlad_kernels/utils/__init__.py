from .dispatch import resolve_impl, triton_interpreting
from .validation import check_choice, check_float_param, check_linear_inputs, check_targets, check_token_tensor

__all__ = [
    "resolve_impl",
    "triton_interpreting",
    "check_choice",
    "check_float_param",
    "check_linear_inputs",
    "check_targets",
    "check_token_tensor",
]
