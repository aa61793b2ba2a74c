# shellcheck shell=bash disable=SC2034 # sourced: the setups read these
# Every pinned version the CI builds (by .ci/kube-setup and .ci/node-setup), in one place.

# The control plane: kube-apiserver, and from the same module kube-controller-manager,
# kube-scheduler, kubectl and the kubelet (why this kubelet: .ci/node-setup).
K8S_VERSION=v1.37.2
# Kubernetes 1.37 wants etcd >= 3.5.24; Debian's etcd (3.4) lacks RequestWatchProgress.
ETCD_VERSION=v3.7.3

# The node's runtime: containerd 2.x (CRI plugin, runc shim, ctr), runc, the CNI plugins.
CONTAINERD_VERSION=v2.4.2
RUNC_VERSION=v1.5.3
CNI_PLUGINS_VERSION=v1.10.0
# crictl follows the Kubernetes minor; helm v4 installs charts on the node.
CRI_TOOLS_VERSION=v1.37.0
HELM_VERSION=v4.3.2
