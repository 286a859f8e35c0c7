"""Mosquitto configurations and ACL templates, shipped as package data for `careflow ca init`."""
