"""careflow: MQTT-native monitoring, alerting and provisioning for fleets of care devices."""

__all__ = ["__version__"]

__version__ = "0.1.0"
