"""Gateways: the provisioning tutorial's unit (seed 002), built on the provider configuration.
payload.py: what a gateway's payload is and the providers and routes it becomes; service.py:
its life, from a stored record to a health-checked part of the configuration in service."""

from app.llm.gateways.payload import GatewayInvalid
from app.llm.gateways.service import GatewayNameTaken, GatewayService

__all__ = ["GatewayInvalid", "GatewayNameTaken", "GatewayService"]
