"""cx-relay: an LLM webhook gateway for NICE Cognigy.AI and NICE CXone virtual agents."""

__version__ = "0.1.0"
