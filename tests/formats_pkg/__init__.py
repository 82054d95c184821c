"""A user's own number format, defined outside mptrain (tests/test_user_formats.py names it by _target_)."""
