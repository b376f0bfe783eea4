"""The Cognigy LLM-gateway tutorial's REST endpoints (/api/v1/llm-gateway)."""
