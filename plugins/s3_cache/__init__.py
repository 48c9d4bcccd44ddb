"""s3_cache: an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, SeaweedFS) as a fleet's model
cache. ``client.S3Client`` is the small SigV4 client it uses."""
