"""The record names of the server-node messages (the contract zk0.learn.federation describes).

Kept apart from zk0.learn.federation, which builds policies and so imports torch, so that a ClientApp that
only relays messages to a learning worker (zk0.agent.learning_worker) can read and write replies without it.
"""

UPDATE_RECORD = "update"  # reply key of the encoded update (an ArrayRecord from codec.to_array_record)
METRICS_RECORD = "metrics"
GLOBAL_SHA256 = "global-sha256"
STATS_RECORD = "norm-stats"
INFO_RECORD = "info"
SERVER_METRICS_RECORD = "server-metrics"  # evaluate message: the server's metrics of its global
QUERY_STATS = "stats"
# Keys of a train reply's INFO_RECORD. A node that does not train this round (its agent refused the training
# lease) answers with only INFO_RECORD {DECLINED: reason}; one whose lease was revoked mid-training sends the
# update of the steps it did, with {PREEMPTED: reason} (its metrics count the steps actually done).
DECLINED = "declined"
PREEMPTED = "preempted"
# Keys of the INFO_RECORD every reply carries: the node's stable dataset id (a digest, see
# zk0.learn.data.dataset_stable_id) and a human name for reports and plots (the host id, or a dataset name).
DATASET_ID = "dataset-id"
NODE_NAME = "node-name"
