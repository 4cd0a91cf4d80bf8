'use strict';
// Environment variables a cluster-rs primary sets for its workers. The
// preload reads and deletes them before the application starts, so they are
// neither visible to it nor inherited by its own children. (node:cluster's
// NODE_UNIQUE_ID is deliberately not used: it would start the built-in
// worker machinery.)
module.exports = {
  WORKER_ID: 'CLUSTER_RS_WORKER_ID',
  CHANNEL_FD: 'CLUSTER_RS_CHANNEL_FD',
  PRIMARY_PID: 'CLUSTER_RS_PRIMARY_PID',
  ADDON: 'CLUSTER_RS_ADDON',
};
