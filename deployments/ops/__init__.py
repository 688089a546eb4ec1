"""Operations: Prometheus metrics, the Grafana dashboard, autoscaling policy, KubeRay manifests."""
