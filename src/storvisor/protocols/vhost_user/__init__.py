"""vhost-user, back-end side: the message codec (``messages``), the control-plane state
machine (``backend``) and the inflight-buffer layout (``inflight``). Sans-I/O: the export in
``storvisor.exports.vhost_user_blk`` owns the socket, the mappings and the eventfds."""
