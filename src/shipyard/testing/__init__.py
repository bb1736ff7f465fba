"""Test doubles that behave like the real parts: a fake OpenAI server with a set token rate and faults."""

from shipyard.testing.fake_openai import FakeOpenAI, Fault

__all__ = ["FakeOpenAI", "Fault"]
