"""Helpers and builders the tests share. No tests here: pytest collects nothing from it."""
