"""`kuasar-ctl`: a command line for people, over containerd's CRI socket and our sandboxers' sockets."""
