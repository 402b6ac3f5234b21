# ======================================================================================================
# SITE BLOCK: the cluster-specific settings of slurm/loopmoe_*.sbatch. Edit THIS file once per cluster;
# the templates and slurm/common.sh stay as they are. Sourced by slurm/common.sh, never run.
#
# Empty = not exported = NCCL / gloo / Slurm pick for themselves, which is right on a single-NIC host and
# on the one-node CI cluster. A variable already set in the submitting shell wins over this file
# (NCCL_SOCKET_IFNAME=eth1 sbatch ... for one job). The job log prints what was used ("site:" line).
# See docs/slurm.md, "Adapting the templates to a cluster", for how to find the values.
# ======================================================================================================

# --- Network -----------------------------------------------------------------------------------------
# Interface(s) for the bootstrap sockets of NCCL and for gloo (CPU collectives): the one the nodes reach
# each other on. On multi-NIC hosts NCCL may pick a docker/management interface and hang at start-up.
# NCCL takes a list or a prefix (ib0 | eth | ^docker,lo); gloo takes one name (the first item is used).
SITE_SOCKET_IFNAME=""        # e.g. ib0 | bond0 | enp65s0f0        -> NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME
SITE_IB_HCA=""               # InfiniBand/RoCE HCAs for NCCL, e.g. mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7
SITE_IB_GID_INDEX=""         # RoCE only, e.g. 3 (RoCE v2)                                -> NCCL_IB_GID_INDEX
SITE_IB_TIMEOUT=""           # e.g. 22 on large fabrics                                   -> NCCL_IB_TIMEOUT
SITE_IB_RETRY_CNT=""         # e.g. 10                                                    -> NCCL_IB_RETRY_CNT
SITE_NCCL_DEBUG=""           # WARN | INFO (INFO: which NIC/HCA NCCL chose; debug a hang) -> NCCL_DEBUG
# The rendezvous host: the first node's name as `scontrol show hostnames` prints it, plus this suffix
# where the fast network has its own names (e.g. -ib: gpu001 -> gpu001-ib).
SITE_MASTER_HOST_SUFFIX=""

# --- CPU binding (per task) --------------------------------------------------------------------------
# srun --cpu-bind: each task is pinned to its --cpus-per-task cores (no migration between sockets, data
# loader and NCCL proxy threads stay near their cores). "verbose,cores" also prints each task's mask.
# "none" turns binding off. Needs TaskPlugin=task/affinity or task/cgroup; task/none ignores it.
SITE_CPU_BIND="cores"
# srun --distribution: which cores each task gets. Slurm's default (block:cyclic) hands consecutive tasks
# cores from alternating sockets; with the GPUs of socket 0 numbered first (check: nvidia-smi topo -m) use
# "block:block" and --cpus-per-task = cores per socket / GPUs per socket, so task (= GPU) i sits on the
# socket of GPU i. Empty: Slurm's default.
SITE_DISTRIBUTION=""

# --- Memory --------------------------------------------------------------------------------------------
# torch's CUDA allocator: expandable segments grow one mapping instead of caching blocks of every size the
# routed expert buffers take (they change size every layer and step), so fragmentation does not eat the
# headroom. Not exported when PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF is already set.
SITE_CUDA_ALLOC_CONF="expandable_segments:True"
