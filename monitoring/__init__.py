"""Prometheus metrics, drift detection (river), the live dashboard, Grafana/Prometheus provisioning."""
