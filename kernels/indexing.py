"""Index width of the Triton launchers: one rule for every kernel.

32-bit index math is cheaper (fewer registers, IMAD instead of wide multiplies), but it must
hold every index a kernel computes, including the ones past the end of a tensor that a masked
last block computes. A launcher passes the largest index its kernel can form.
"""

#: 32-bit signed index math holds indices below this
INT32_INDEX_LIMIT = 2**31


def needs_int64_index(largest_index: int) -> bool:
    """Whether a kernel whose largest computed index is ``largest_index`` needs 64-bit math."""
    return largest_index >= INT32_INDEX_LIMIT
