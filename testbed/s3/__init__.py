"""Local S3 endpoints: rclone serve s3 (`rclone`), moto (`moto_server`), and a proxy in
front of either (`proxy`) that counts requests (`operations`), imitates Backblaze B2 and
injects faults (`faults`). Everything binds to 127.0.0.1 only."""
