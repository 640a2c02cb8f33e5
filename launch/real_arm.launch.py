"""Run a policy on a real arm driven by an existing ros2_control driver (nothing simulated is started).

    ros2 launch vla_stack real_arm.launch.py robot:=so101 policy:=/path/to/checkpoint \
        controller:=arm_controller joint_states_topic:=/joint_states \
        front_camera_topic:=/camera_front/image_raw wrist_camera_topic:=/camera_wrist/image_raw

The policy node sends its chunks through the safety layer (joint limits, derated velocity/acceleration,
workspace, a 200 ms input watchdog, ~/estop) to <controller>/follow_joint_trajectory when control_msgs is
installed and the controller serves it, else to <controller>/joint_trajectory. Publish the instruction on the
instruction topic (std_msgs/String). The robot driver keeps its own discovery and domain settings.
"""

from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription

CONFIG = "real_arm.yaml"


def generate_launch_description() -> LaunchDescription:
    config = PathJoinSubstitution([FindPackageShare("vla_stack"), "config", CONFIG])
    arg = LaunchConfiguration
    return LaunchDescription([
        DeclareLaunchArgument("robot", default_value="so101", description="panda or so101"),
        DeclareLaunchArgument("policy", description="Checkpoint path (or 'expert' only with an oracle topic)"),
        DeclareLaunchArgument("controller", default_value="arm_controller"),
        DeclareLaunchArgument("gripper_controller", default_value="gripper_controller"),
        DeclareLaunchArgument("joint_states_topic", default_value="joint_states"),
        DeclareLaunchArgument("front_camera_topic", default_value="front/image_raw"),
        DeclareLaunchArgument("wrist_camera_topic", default_value="wrist/image_raw"),
        DeclareLaunchArgument("instruction_topic", default_value="task/instruction"),
        DeclareLaunchArgument("inference_steps", default_value="0",
                              description="Euler steps per action chunk (0 = the checkpoint's)"),
        DeclareLaunchArgument("velocity_scale", default_value="0.5", description="Fraction of the velocity limits"),
        DeclareLaunchArgument("use_sim_time", default_value="false"),
        Node(package="vla_stack", executable="policy_node", name="policy_node", output="screen",
             parameters=[config, {"robot": arg("robot"), "policy": arg("policy"), "controller": arg("controller"),
                                  "gripper_controller": arg("gripper_controller"),
                                  "velocity_scale": arg("velocity_scale"), "use_sim_time": arg("use_sim_time"),
                                  "inference_steps": arg("inference_steps"),
                                  "autostart": True}],
             remappings=[("joint_states", arg("joint_states_topic")),
                         ("front/image_raw", arg("front_camera_topic")),
                         ("wrist/image_raw", arg("wrist_camera_topic")),
                         ("task/instruction", arg("instruction_topic"))]),
    ])
