"""Grafana dashboards and provisioning files, shipped as package data."""
