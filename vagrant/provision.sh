#!/usr/bin/env bash
# Provision a VM exactly as the README sets up a machine: run the project's own
# scripts/setup.sh from the project tree, nothing else.
#   vagrant/provision.sh [TREE]
# TREE defaults to the tree this script sits in. Vagrant uploads provisioning
# scripts to /tmp before running them, so the Vagrantfile passes /vagrant.
set -euo pipefail
tree=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
[ -f "$tree/scripts/setup.sh" ] || { echo "provision: no scripts/setup.sh under $tree" >&2; exit 1; }
exec bash "$tree/scripts/setup.sh"
