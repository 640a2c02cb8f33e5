"""Record teleoperated demonstrations: (sim_node or a real arm's driver) + teleop_node + recorder_node.

    ros2 launch vla_stack teleop_record.launch.py store:=$HOME/demos/pick-panda.zarr
    ros2 run teleop_twist_keyboard teleop_twist_keyboard          # or a joystick / spacemouse Twist driver
    ros2 service call /recorder_node/start std_srvs/srv/Trigger    # ... then /recorder_node/stop or /discard

use_sim:=false records a real arm: its driver provides joint_states, the cameras and the controllers.
"""

from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import EnvironmentVariable, LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription

CONFIG = "teleop_record.yaml"


def generate_launch_description() -> LaunchDescription:
    config = PathJoinSubstitution([FindPackageShare("vla_stack"), "config", CONFIG])
    arg = LaunchConfiguration
    common = {"robot": arg("robot"), "use_sim_time": arg("use_sim_time"), "controller": arg("controller")}
    cameras = [("front/image_raw", arg("front_camera_topic")), ("wrist/image_raw", arg("wrist_camera_topic"))]
    joints = [("joint_states", arg("joint_states_topic"))]
    return LaunchDescription([
        DeclareLaunchArgument("robot", default_value="panda", description="panda or so101"),
        DeclareLaunchArgument("task", default_value="pick", description="Task family of the scene (sim) and episodes"),
        DeclareLaunchArgument("use_sim", default_value="true", description="false: a real arm's driver is running"),
        DeclareLaunchArgument("store", description="Zarr episode store to append to"),
        DeclareLaunchArgument("instruction", default_value="",
                              description="Instruction stored with real-arm episodes (the sim publishes its own)"),
        DeclareLaunchArgument("keyboard", default_value="false", description="Built-in terminal keyboard teleop"),
        DeclareLaunchArgument("controller", default_value="arm_controller"),
        DeclareLaunchArgument("joint_states_topic", default_value="joint_states"),
        DeclareLaunchArgument("front_camera_topic", default_value="front/image_raw"),
        DeclareLaunchArgument("wrist_camera_topic", default_value="wrist/image_raw"),
        DeclareLaunchArgument("use_sim_time", default_value="false"),
        DeclareLaunchArgument("domain_id", default_value=EnvironmentVariable("ROS_DOMAIN_ID", default_value="0")),
        SetEnvironmentVariable("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST"),
        SetEnvironmentVariable("ROS_DOMAIN_ID", arg("domain_id")),
        Node(package="vla_stack", executable="sim_node", name="sim_node", output="screen",
             condition=IfCondition(arg("use_sim")),
             parameters=[config, common, {"task": arg("task"), "publish_clock": arg("use_sim_time")}],
             remappings=[*cameras, *joints]),
        Node(package="vla_stack", executable="teleop_node", name="teleop_node", output="screen",
             parameters=[config, common, {"keyboard": arg("keyboard")}], remappings=joints),
        Node(package="vla_stack", executable="recorder_node", name="recorder_node", output="screen",
             parameters=[config, common, {"store": arg("store"), "task": arg("task"),
                                          "instruction": arg("instruction")}],
             remappings=[*cameras, *joints]),
    ])
