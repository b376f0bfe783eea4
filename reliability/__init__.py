"""The slow reliability suites (`make reliability`): crash consistency and soak against the real
service, and the report in docs/RELIABILITY.md. See reliability/run.py."""
