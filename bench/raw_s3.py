"""The S3 limit: a multipart upload of N bytes to moto with boto3, or one GET of that object to nowhere.

Parts are 16 MiB, sent one after another, as dtrguard sends them; the bytes are random, so nothing compresses.
"""

from __future__ import annotations

import argparse
import os

import boto3

PART = 16 * 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("action", choices=["upload", "download"])
    parser.add_argument("--bytes", type=int, default=0)
    args = parser.parse_args()
    client = boto3.client("s3", endpoint_url=args.url, region_name="us-east-1")
    if args.action == "upload":
        block = os.urandom(PART)
        upload = client.create_multipart_upload(Bucket=args.bucket, Key=args.key)["UploadId"]
        parts, sent, number = [], 0, 1
        while sent < args.bytes:
            size = min(PART, args.bytes - sent)
            reply = client.upload_part(
                Bucket=args.bucket, Key=args.key, UploadId=upload, PartNumber=number, Body=block[:size]
            )
            parts.append({"PartNumber": number, "ETag": reply["ETag"]})
            sent += size
            number += 1
        client.complete_multipart_upload(
            Bucket=args.bucket, Key=args.key, UploadId=upload, MultipartUpload={"Parts": parts}
        )
    else:
        body = client.get_object(Bucket=args.bucket, Key=args.key)["Body"]
        while body.read(1024 * 1024):
            pass


if __name__ == "__main__":
    main()
