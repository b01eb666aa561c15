# OpenBao server configuration for the tunnel deployment shape (docs/deploy/compose.yaml).
# Server mode: data persists in Raft storage, the vault starts sealed and must be initialised
# and unsealed by the operator (docs/operator-guide.md, "First start"). Never dev mode.

storage "raft" {
  # The openbao-data volume; the image owns this directory as its openbao user.
  path    = "/openbao/file"
  node_id = "openbao-1"
}

listener "tcp" {
  address = "0.0.0.0:8200"
  # Plain HTTP, reachable only on the compose `data` network (internal: true; no ports are
  # published). To encrypt this hop too, mount a certificate and set tls_cert_file and
  # tls_key_file here, and give the relay an https BAO_ADDR.
  tls_disable = true
}

api_addr     = "http://openbao:8200"
cluster_addr = "http://openbao:8201"

# Raft memory-maps its files, which mlock does not combine well with; the container has no swap
# configured for it in this shape (disable swap on the host, or encrypt it).
disable_mlock = true

ui = false
