"""Test data: a tiny prepared directory (see medattn.data.fake)."""
from medattn.data.fake import write_fake_prepared as make_prepared  # noqa: F401
