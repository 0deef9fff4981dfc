"""The AWS templates in packaging/: the CloudFormation stack and the Packer AMI build.

The stack is linted with cfn-lint and then evaluated offline for chosen parameter values: a small
resolver applies Ref, Fn::If, Fn::Sub and the template's Conditions, so each check reads the
resources CloudFormation would create. Nothing here calls AWS.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cfnlint.decode import cfn_yaml

from dtrguard import config

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "packaging" / "cloudformation" / "dtrguard.yaml"
PACKER_DIR = ROOT / "packaging" / "packer"
PACKER_TEMPLATE = PACKER_DIR / "dtrguard.pkr.hcl"
PROVISION_SCRIPT = PACKER_DIR / "provision.sh"

S3_ACTIONS = {
    "s3:ListBucket",
    "s3:GetObject",
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListBucketMultipartUploads",
    "s3:GetBucketVersioning",
}
KMS_ACTIONS = {"kms:GenerateDataKey", "kms:Decrypt"}
BUCKET_ACTIONS = {
    "s3:ListBucket",
    "s3:ListBucketMultipartUploads",
    "s3:GetBucketVersioning",
}
OBJECT_ACTIONS = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}

KMS_KEY = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
REQUIRED_PARAMETERS = {
    "AmiId": "ami-0123456789abcdef0",
    "SubnetIds": ["subnet-0aaa", "subnet-0bbb"],
    "VpcId": "vpc-0123",
    "ClientCidr": "10.0.0.0/8",
    "BucketName": "example-dtr-backups",
    "CreateBucket": "true",
}
PSEUDO_PARAMETERS = {
    "AWS::Region": "eu-west-1",
    "AWS::Partition": "aws",
    "AWS::AccountId": "123456789012",
    "AWS::StackName": "dtr-test",
}
NO_VALUE = object()


class Stack:
    """The template's resources and outputs as CloudFormation would resolve them for parameters.

    A Ref to a resource gives "ref:<name>" and Fn::GetAtt gives "getatt:<name>.<attribute>",
    except that a bucket's Ref and Arn give its name and ARN.
    """

    def __init__(self, template: dict[str, Any], parameters: dict[str, Any]):
        self.template = template
        self.values: dict[str, Any] = dict(PSEUDO_PARAMETERS)
        for name, declaration in template["Parameters"].items():
            if "Default" in declaration:
                self.values[name] = declaration["Default"]
        unknown = set(parameters) - set(template["Parameters"])
        assert not unknown, f"parameters not declared by the template: {unknown}"
        self.values.update(parameters)
        self.conditions: dict[str, bool] = {}
        for name, body in template.get("Conditions", {}).items():  # a condition may name one declared above it
            self.conditions[name] = self.condition(body)

    def condition(self, node: Any) -> bool:
        [(function, arguments)] = node.items()
        if function == "Fn::Equals":
            left, right = (self.resolve(argument) for argument in arguments)
            return str(left) == str(right)
        if function == "Fn::Not":
            return not self.condition(arguments[0])
        if function == "Fn::And":
            return all(self.condition(argument) for argument in arguments)
        if function == "Fn::Or":
            return any(self.condition(argument) for argument in arguments)
        if function == "Condition":
            return self.conditions[arguments]
        raise AssertionError(f"condition function {function} is not supported by this test")

    def ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in self.values:
            return self.values[name]
        resource = self.template["Resources"][name]
        if resource["Type"] == "AWS::S3::Bucket":
            return self.resolve(resource["Properties"]["BucketName"])
        return f"ref:{name}"

    def get_att(self, name: str, attribute: str) -> str:
        resource = self.template["Resources"][name]
        if resource["Type"] == "AWS::S3::Bucket" and attribute == "Arn":
            return f"arn:aws:s3:::{self.ref(name)}"
        return f"getatt:{name}.{attribute}"

    def substitute(self, text: str, variables: dict[str, Any]) -> str:
        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in variables:
                return str(variables[name])
            if "." in name:
                return self.get_att(*name.split(".", 1))
            return str(self.ref(name))

        return re.sub(r"\$\{([^}]+)\}", replace, text)

    def resolve(self, node: Any) -> Any:
        if isinstance(node, dict) and len(node) == 1:
            [(key, argument)] = node.items()
            if key == "Ref":
                return self.ref(argument)
            if key == "Fn::If":
                name, when_true, when_false = argument
                return self.resolve(when_true if self.conditions[name] else when_false)
            if key == "Fn::Sub":
                if isinstance(argument, str):
                    return self.substitute(argument, {})
                text, variables = argument
                return self.substitute(text, {name: self.resolve(value) for name, value in variables.items()})
            if key == "Fn::GetAtt":
                name, attribute = argument.split(".", 1) if isinstance(argument, str) else argument
                return self.get_att(name, attribute)
            if key == "Fn::Base64":
                # Kept as text, so the checks read the user data as the instance receives it.
                return self.resolve(argument)
            assert not key.startswith("Fn::"), f"intrinsic function {key} is not supported by this test"
        if isinstance(node, dict):
            resolved = {key: self.resolve(value) for key, value in node.items()}
            return {key: value for key, value in resolved.items() if value is not NO_VALUE}
        if isinstance(node, list):
            items = [self.resolve(item) for item in node]
            return [item for item in items if item is not NO_VALUE]
        return node

    def resources(self, resource_type: str | None = None) -> dict[str, dict[str, Any]]:
        """Return the resources created for these parameters, resolved, by logical id."""
        created = {}
        for name, resource in self.template["Resources"].items():
            if "Condition" in resource and not self.conditions[resource["Condition"]]:
                continue
            if resource_type is None or resource["Type"] == resource_type:
                created[name] = self.resolve(resource)
        return created

    def resource(self, resource_type: str) -> dict[str, Any]:
        """Return the one created resource of a type."""
        found = self.resources(resource_type)
        assert len(found) == 1, f"expected one {resource_type}, found {sorted(found)}"
        return next(iter(found.values()))

    def outputs(self) -> dict[str, Any]:
        return {name: self.resolve(output["Value"]) for name, output in self.template["Outputs"].items()}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    loaded: dict[str, Any] = cfn_yaml.load(str(STACK))
    return loaded


def make_stack(template: dict[str, Any], **parameters: Any) -> Stack:
    return Stack(template, {**REQUIRED_PARAMETERS, **parameters})


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def policy_statements(stack: Stack) -> Iterator[dict[str, Any]]:
    """Yield every statement of every identity policy the stack creates."""
    for role in stack.resources("AWS::IAM::Role").values():
        for policy in role["Properties"].get("Policies", []):
            yield from policy["PolicyDocument"]["Statement"]
    for policy_type in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
        for policy in stack.resources(policy_type).values():
            yield from policy["Properties"]["PolicyDocument"]["Statement"]


def granted(stack: Stack) -> dict[str, list[dict[str, Any]]]:
    """Map each allowed action to the statements that allow it."""
    actions: dict[str, list[dict[str, Any]]] = {}
    for statement in policy_statements(stack):
        assert statement["Effect"] == "Allow", statement
        for action in as_list(statement["Action"]):
            actions.setdefault(action, []).append(statement)
    return actions


# cfn-lint


def cfn_lint_command() -> str:
    beside_python = Path(sys.executable).with_name("cfn-lint")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("cfn-lint")
    if found is None:
        pytest.fail("cfn-lint is not installed; install it with `pip install cfn-lint`")
    return found


def test_cfn_lint_clean() -> None:
    result = subprocess.run(
        [cfn_lint_command(), str(STACK)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "AWS_EC2_METADATA_DISABLED": "true"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.strip() == ""


# IAM


@pytest.mark.parametrize("kms_key", ["", KMS_KEY])
def test_policy_grants_only_listed_actions(template: dict[str, Any], kms_key: str) -> None:
    stack = make_stack(template, KmsKeyArn=kms_key)
    for statement in policy_statements(stack):
        assert "NotAction" not in statement, statement
        assert "NotResource" not in statement, statement
        assert statement["Effect"] == "Allow", statement
        for action in as_list(statement["Action"]):
            assert "*" not in action, statement
            assert action in S3_ACTIONS | KMS_ACTIONS, statement
        for resource in as_list(statement["Resource"]):
            assert resource != "*", statement


def test_policy_without_kms_key(template: dict[str, Any]) -> None:
    actions = granted(make_stack(template, KmsKeyArn=""))
    assert set(actions) == S3_ACTIONS


def test_policy_with_kms_key(template: dict[str, Any]) -> None:
    actions = granted(make_stack(template, KmsKeyArn=KMS_KEY))
    assert set(actions) == S3_ACTIONS | KMS_ACTIONS
    for action in KMS_ACTIONS:
        for statement in actions[action]:
            assert as_list(statement["Resource"]) == [KMS_KEY]


def test_policy_for_client_side_encryption(template: dict[str, Any]) -> None:
    statements = list(policy_statements(make_stack(template, KmsKeyArn=KMS_KEY, ClientSideEncryption="true")))
    direct = [s for s in statements if "kms:Decrypt" in as_list(s["Action"]) and "kms:ViaService" not in str(s)]
    assert len(direct) == 1
    assert as_list(direct[0]["Resource"]) == [KMS_KEY]
    assert direct[0]["Condition"] == {"Null": {"kms:EncryptionContext:dtrguard:set": "false"}}
    # Without a key the parameter grants nothing.
    assert set(granted(make_stack(template, ClientSideEncryption="true"))) == S3_ACTIONS


def test_policy_limits_s3_resources(template: dict[str, Any]) -> None:
    stack = make_stack(template, BucketName="my-dtr", Prefix="dtr/prod")
    actions = granted(stack)
    for action in BUCKET_ACTIONS:
        for statement in actions[action]:
            assert as_list(statement["Resource"]) == ["arn:aws:s3:::my-dtr"], action
    for action in OBJECT_ACTIONS:
        for statement in actions[action]:
            assert as_list(statement["Resource"]) == ["arn:aws:s3:::my-dtr/dtr/prod/*"], action


def test_policy_lists_only_under_prefix(template: dict[str, Any]) -> None:
    actions = granted(make_stack(template, Prefix="dtr/prod"))
    [statement] = actions["s3:ListBucket"]
    assert as_list(statement["Action"]) == ["s3:ListBucket"]
    assert statement["Condition"] == {"StringLike": {"s3:prefix": ["dtr/prod/*"]}}


def test_role_has_no_managed_policies(template: dict[str, Any]) -> None:
    stack = make_stack(template)
    role = stack.resource("AWS::IAM::Role")["Properties"]
    assert "ManagedPolicyArns" not in role
    assert stack.resources("AWS::IAM::ManagedPolicy") == {}
    [trust] = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": "ec2.amazonaws.com"}


# Auto Scaling group, load balancer, launch template


def test_group_of_one_with_elb_checks(template: dict[str, Any]) -> None:
    stack = make_stack(template)
    group = stack.resource("AWS::AutoScaling::AutoScalingGroup")["Properties"]
    assert str(group["MinSize"]) == "1"
    assert str(group["MaxSize"]) == "1"
    assert str(group["DesiredCapacity"]) == "1"
    assert group["HealthCheckType"] == "ELB"
    assert group["HealthCheckGracePeriod"] == 1800
    assert group["VPCZoneIdentifier"] == REQUIRED_PARAMETERS["SubnetIds"]
    assert group["TargetGroupARNs"] == ["ref:TargetGroup"]


def test_grace_period_is_a_parameter(template: dict[str, Any]) -> None:
    group = make_stack(template, HealthCheckGracePeriod=5400).resource("AWS::AutoScaling::AutoScalingGroup")
    assert group["Properties"]["HealthCheckGracePeriod"] == 5400


def test_load_balancer_checks_tcp_443(template: dict[str, Any]) -> None:
    stack = make_stack(template)
    balancer = stack.resource("AWS::ElasticLoadBalancingV2::LoadBalancer")["Properties"]
    assert balancer["Scheme"] == "internal"
    assert balancer["Type"] == "network"
    target_group = stack.resources("AWS::ElasticLoadBalancingV2::TargetGroup")["TargetGroup"]["Properties"]
    assert target_group["Protocol"] == "TCP"
    assert target_group["Port"] == 443
    assert target_group["HealthCheckProtocol"] == "TCP"
    assert target_group["HealthCheckPort"] == "traffic-port"
    listener = stack.resource("AWS::ElasticLoadBalancingV2::Listener")["Properties"]
    assert listener["Protocol"] == "TCP"
    assert listener["Port"] == 443


def test_launch_template_requires_imdsv2(template: dict[str, Any]) -> None:
    data = make_stack(template).resource("AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]
    options = data["MetadataOptions"]
    assert options["HttpTokens"] == "required"
    assert options["HttpPutResponseHopLimit"] == 1
    assert options.get("HttpEndpoint", "enabled") == "enabled"


def test_key_pair_only_when_set(template: dict[str, Any]) -> None:
    without = make_stack(template).resource("AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]
    assert "KeyName" not in without
    given = make_stack(template, KeyName="ops").resource("AWS::EC2::LaunchTemplate")
    assert given["Properties"]["LaunchTemplateData"]["KeyName"] == "ops"


# User data


def user_data_config(template: dict[str, Any], tmp_path: Path, **parameters: Any) -> tuple[dict[str, Any], Path]:
    """Return the cloud-config's write_files entry for dtrguard.toml, and the file written from it."""
    data = make_stack(template, **parameters).resource("AWS::EC2::LaunchTemplate")["Properties"]["LaunchTemplateData"]
    user_data = data["UserData"]
    assert user_data.startswith("#cloud-config\n")
    cloud_config = yaml.safe_load(user_data)
    [entry] = [item for item in cloud_config["write_files"] if item["path"] == "/etc/dtrguard/dtrguard.toml"]
    path = tmp_path / "dtrguard.toml"
    path.write_text(entry["content"])
    return entry, path


def test_user_data_writes_valid_config(template: dict[str, Any], tmp_path: Path) -> None:
    entry, path = user_data_config(template, tmp_path, BucketName="my-dtr", Prefix="dtr/prod")
    assert entry["permissions"] == "0600"
    assert entry["owner"] == "root:root"
    assert "defer" not in entry
    settings = config.load(path)
    assert settings.s3.bucket == "my-dtr"
    assert settings.s3.prefix == "dtr/prod"
    assert settings.s3.region == PSEUDO_PARAMETERS["AWS::Region"]
    assert settings.s3.kms_key_id is None
    assert settings.node.instance_id_source == "imds"


def test_user_data_sets_kms_key(template: dict[str, Any], tmp_path: Path) -> None:
    _, path = user_data_config(template, tmp_path, KmsKeyArn=KMS_KEY)
    assert config.load(path).s3.kms_key_id == KMS_KEY


def test_user_data_sets_envelope_key(template: dict[str, Any], tmp_path: Path) -> None:
    _, path = user_data_config(template, tmp_path, KmsKeyArn=KMS_KEY, ClientSideEncryption="true")
    assert config.load(path).s3.envelope_kms_key_id == KMS_KEY
    _, path = user_data_config(template, tmp_path, KmsKeyArn=KMS_KEY)
    assert config.load(path).s3.envelope_kms_key_id is None


def test_user_data_names_existing_bucket(template: dict[str, Any], tmp_path: Path) -> None:
    _, path = user_data_config(template, tmp_path, CreateBucket="false", BucketName="existing-bucket")
    assert config.load(path).s3.bucket == "existing-bucket"


# Bucket


def test_bucket_versioned_and_private(template: dict[str, Any]) -> None:
    stack = make_stack(template, NoncurrentVersionDays=45)
    bucket = stack.resource("AWS::S3::Bucket")
    assert bucket["DeletionPolicy"] == "Retain"
    properties = bucket["Properties"]
    assert properties["BucketName"] == REQUIRED_PARAMETERS["BucketName"]
    assert properties["VersioningConfiguration"] == {"Status": "Enabled"}
    assert properties["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }
    rules = properties["LifecycleConfiguration"]["Rules"]
    aborting = [rule for rule in rules if "AbortIncompleteMultipartUpload" in rule]
    assert aborting, rules
    assert all(rule["Status"] == "Enabled" for rule in aborting)
    assert all(rule["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1} for rule in aborting)
    expiring = [rule for rule in rules if "NoncurrentVersionExpiration" in rule]
    assert [rule["NoncurrentVersionExpiration"] for rule in expiring] == [{"NoncurrentDays": 45}]
    assert stack.resource("AWS::S3::BucketPolicy")["Properties"]["Bucket"] == properties["BucketName"]


def test_bucket_policy_denies_plain_http(template: dict[str, Any]) -> None:
    policy = make_stack(template).resource("AWS::S3::BucketPolicy")["Properties"]["PolicyDocument"]
    [statement] = policy["Statement"]
    assert statement["Effect"] == "Deny"
    assert statement["Principal"] == "*"
    assert statement["Action"] == "s3:*"
    assert statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    bucket_arn = "arn:aws:s3:::" + REQUIRED_PARAMETERS["BucketName"]
    assert statement["Resource"] == [bucket_arn, bucket_arn + "/*"]


@pytest.mark.parametrize(
    ("kms_key", "expected"),
    [
        ("", {"SSEAlgorithm": "AES256"}),
        (KMS_KEY, {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": KMS_KEY}),
    ],
)
def test_bucket_encryption(template: dict[str, Any], kms_key: str, expected: dict[str, str]) -> None:
    bucket = make_stack(template, KmsKeyArn=kms_key).resource("AWS::S3::Bucket")["Properties"]
    [rule] = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"] == expected


def test_existing_bucket_is_not_created(template: dict[str, Any]) -> None:
    stack = make_stack(template, CreateBucket="false", BucketName="existing-bucket")
    assert stack.resources("AWS::S3::Bucket") == {}
    assert stack.resources("AWS::S3::BucketPolicy") == {}
    assert stack.outputs()["BucketName"] == "existing-bucket"


def test_outputs(template: dict[str, Any]) -> None:
    outputs = make_stack(template).outputs()
    assert outputs == {
        "AutoScalingGroupName": "ref:AutoScalingGroup",
        "LoadBalancerDnsName": "getatt:LoadBalancer.DNSName",
        "BucketName": REQUIRED_PARAMETERS["BucketName"],
        "InstanceRoleArn": "getatt:InstanceRole.Arn",
    }


# Packer


def hcl_variable_block(name: str) -> str:
    match = re.search(rf'^variable "{name}" {{\n(.*?)^}}', PACKER_TEMPLATE.read_text(), re.S | re.M)
    assert match, f"variable {name} not found in {PACKER_TEMPLATE}"
    return match.group(1)


def test_packer_validate_syntax_only() -> None:
    """Run `packer validate -syntax-only` and `packer fmt -check` with the packer on PATH.

    Debian 12's packer 1.6.6 checks HCL syntax and the top-level blocks with -syntax-only, not the
    arguments of the amazon-ebs source or the provisioners. Plain `validate` is not run because it
    prepares the Amazon builder, which may call AWS.
    """
    packer = shutil.which("packer")
    if packer is None:
        pytest.skip("packer is not installed (Debian's package is `packer`)")
    environment = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true", "CHECKPOINT_DISABLE": "1"}
    validate = subprocess.run(
        [packer, "validate", "-syntax-only", "-var", "deb_path=/tmp/dtrguard_0.1.0_amd64.deb", PACKER_TEMPLATE.name],
        cwd=PACKER_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )
    assert validate.returncode == 0, validate.stdout + validate.stderr
    formatted = subprocess.run(
        [packer, "fmt", "-check", PACKER_TEMPLATE.name],
        cwd=PACKER_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )
    assert formatted.returncode == 0, "run `packer fmt packaging/packer/dtrguard.pkr.hcl`"


def test_packer_source_is_debian_12() -> None:
    text = PACKER_TEMPLATE.read_text()
    assert re.search(r'owners\s*=\s*\["136693071363"\]', text)
    assert re.search(r'name\s*=\s*"debian-12-amd64-\*"', text)
    assert re.search(r'http_tokens\s*=\s*"required"', text)
    assert 'script = "${path.root}/provision.sh"' in text


def test_packer_images_match_dtr_version(template: dict[str, Any]) -> None:
    version = re.search(r'default\s*=\s*"([^"]+)"', hcl_variable_block("dtr_version"))
    assert version
    assert version.group(1) == template["Parameters"]["DtrVersion"]["Default"]
    images = re.findall(r'"([^"]+)"', hcl_variable_block("dtr_images"))
    assert f"docker/trusted-registry:{version.group(1)}" in images
    assert "postgres:9.4.1" in images


STUB = """#!/bin/sh
echo "{name} $*" >> "$STUB_CALLS"
"""
DOCKER_STUB = """#!/bin/sh
echo "docker $*" >> "$STUB_CALLS"
case "$1" in
pull) echo "$2" >> "$STUB_PULLED" ;;
image) grep -qx "$3" "$STUB_PULLED" ;;
esac
"""
DTRGUARD_STUB = """#!/bin/sh
echo "dtrguard $*" >> "$STUB_CALLS"
exit "${STUB_DTRGUARD_EXIT:-0}"
"""


def run_provision_script(tmp_path: Path, **environment: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run provision.sh with stub commands, in a mount namespace whose /etc/systemd/system is a tmpfs.

    The namespace keeps the script's unit drop-in off this machine. Return the finished process and
    the stub calls in order. The process's stdout ends with the drop-in that the script wrote.
    """
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give the script a private /etc/systemd/system")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m failed: {probe.stderr.decode(errors='replace').strip()}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("apt-get", "cloud-init", "systemctl"):
        (bin_dir / name).write_text(STUB.format(name=name))
    (bin_dir / "docker").write_text(DOCKER_STUB)
    (bin_dir / "dtrguard").write_text(DTRGUARD_STUB)
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    deb = tmp_path / "dtrguard_0.1.0_amd64.deb"
    deb.write_bytes(b"")
    calls = tmp_path / "calls"
    calls.touch()
    pulled = tmp_path / "pulled"
    pulled.touch()
    script = (
        'mount -t tmpfs tmpfs /etc/systemd/system && sh "$0" && '
        "cat /etc/systemd/system/dtrguard.service.d/after-cloud-init.conf"
    )
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, str(PROVISION_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "STUB_CALLS": str(calls),
            "STUB_PULLED": str(pulled),
            "DEB": str(deb),
            **environment,
        },
    )
    return result, calls.read_text().splitlines()


IMAGES = "docker/trusted-registry:1.4.3 docker/trusted-registry-admin-server:1.4.3 postgres:9.4.1"


def test_provision_script_order(tmp_path: Path) -> None:
    result, calls = run_provision_script(tmp_path, DTR_VERSION="1.4.3", DTR_IMAGES=IMAGES)
    assert result.returncode == 0, result.stderr
    deb = str(tmp_path / "dtrguard_0.1.0_amd64.deb")
    expected = [
        f"apt-get install -y docker.io {deb}",
        "docker pull docker/trusted-registry:1.4.3",
        "docker pull docker/trusted-registry-admin-server:1.4.3",
        "docker pull postgres:9.4.1",
        "systemctl enable dtrguard.service",
        "dtrguard prepare-image --yes",
        "cloud-init clean --logs",
    ]
    positions = [calls.index(call) for call in expected]
    assert positions == sorted(positions), calls
    assert calls[-1] == "cloud-init clean --logs"
    assert result.stdout.splitlines()[-2:] == ["[Unit]", "After=cloud-init.service"]


def test_provision_fails_without_installer_image(tmp_path: Path) -> None:
    result, calls = run_provision_script(tmp_path, DTR_VERSION="1.4.4", DTR_IMAGES=IMAGES)
    assert result.returncode != 0
    assert "image docker/trusted-registry:1.4.4 not found" in result.stderr
    assert "dtrguard prepare-image --yes" not in calls


def test_provision_fails_when_prepare_image_refuses(tmp_path: Path) -> None:
    result, calls = run_provision_script(tmp_path, DTR_VERSION="1.4.3", DTR_IMAGES=IMAGES, STUB_DTRGUARD_EXIT="3")
    assert result.returncode != 0
    assert calls[-1] == "dtrguard prepare-image --yes"
